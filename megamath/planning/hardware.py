"""The GPUs `megamath plan` knows: memory, peak, bandwidths, and the stated assumptions about them.

Why a table: a plan is napkin math over a handful of numbers per GPU, and every one of them must be
visible and overridable, not buried in formulas. Sources: NVIDIA's data sheets for the peaks, HBM
bandwidths and memory of the SXM parts (memory: what CUDA can allocate, torch.cuda.get_device_properties'
total_memory; on Hopper that is nvidia-smi's total less the ~0.5 GiB the driver reserves); the others are
stated assumptions, printed with every plan:

- `efficiency`: the fraction of the dense bf16 peak the model's matmul-dominated compute achieves, used
  only until perf/results/ holds a training step measured on that GPU (measured.py), so these are stated
  defaults (Megatron-style 7B-70B runs report 50-60 % of peak on A100s; Hopper's higher peak is harder
  to reach, 40-50 %). `--efficiency` overrides both.
- `nvlink_gbs`: the all-reduce bus bandwidth inside a node (nccl-tests' busbw on 8 GPUs, GB/s).
- `internode_gbs`: bytes per second per GPU across nodes: one 200 Gb/s HDR InfiniBand NIC per A100, one
  400 Gb/s NDR NIC per H100/H200 (DGX / SuperPOD designs). `--internode-gbs` overrides for other fabrics.
- `alpha_*`: per-hop latency of a ring collective (NCCL's order of magnitude), seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    """Device memory CUDA can allocate (the smallest total_memory seen across drivers)."""
    peak_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    hbm_gbs: float
    """HBM bandwidth, GB/s (the optimizer step is memory-bound)."""
    nvlink_gbs: float
    internode_gbs: float
    efficiency: float
    alpha_intra: float = 5e-6
    alpha_inter: float = 10e-6


MiB = 2**20
GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 40_536 * MiB, 312.0, 1_555.0, 230.0, 25.0, 0.50),
    "a100-80gb": GPU("a100-80gb", 81_920 * MiB, 312.0, 2_039.0, 230.0, 25.0, 0.50),
    "h100-80gb": GPU("h100-80gb", 81_082 * MiB, 989.0, 3_350.0, 370.0, 50.0, 0.45),
    "h200": GPU("h200", 143_156 * MiB, 989.0, 4_800.0, 370.0, 50.0, 0.45),
}

RUNTIME_RESERVE_BYTES = int(1.5 * GiB)
"""Device memory outside PyTorch's allocator: the CUDA context and kernels (~1 GiB) and NCCL's channel
buffers for the TP and DP communicators (~0.5 GiB). A stated assumption."""
ALLOCATOR_HEADROOM = 0.05
"""Fraction of the allocated peak kept free for the caching allocator's fragmentation (stated)."""


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[name]
