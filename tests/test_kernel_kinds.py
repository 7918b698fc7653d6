"""megamath.training.kernel_kinds: a profiled step's kernels summed by kind, the table a GPU session leaves."""
from __future__ import annotations

import time

import pytest
import torch

from megamath.model import Llama, ModelConfig
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.training import kernel_kinds
from megamath.training.loop import train_step


@pytest.mark.parametrize("name, kind", [
    # CUDA kernel names as torch.profiler reports them on an H100 (cuBLAS, PyTorch, cuDNN, NCCL) and ours
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "gemm"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("_fwd_kernel", "attention"), ("_bwd_dkdv_kernel", "attention"), ("_bwd_dq_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >(Flash_fwd_params)",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1", "attention"),
    ("_rms_norm_fwd_kernel", "norm"), ("_rms_norm_bwd_kernel", "norm"), ("_rope_kernel", "rope"),
    ("_swiglu_bwd_kernel", "swiglu"), ("_ce_forward_kernel", "cross-entropy"), ("_adamw_kernel", "optimizer"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
     "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)", "other"),
    # CPU ops
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::silu", "swiglu"), ("aten::_log_softmax", "cross-entropy"),
])
def test_kernel_names_fall_into_their_kind(name, kind):
    assert kernel_kinds.kind_of(name) == kind


def test_a_profiled_step_adds_up_and_renders():
    config = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         ffn_hidden_size=128, max_seq_length=32, kernels="reference")
    state = ParallelState.single()
    model = Llama(config)
    optimizer = ZeroOptimizer(model, state, OptimizerConfig(), split_names=model.split_parameter_names())
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    train_step(model, optimizer, batch, 1e-3, state)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        start = time.perf_counter()
        for step in range(2):
            with torch.profiler.record_function(f"step {step}"):  # an annotation: no work of its own
                train_step(model, optimizer, batch, 1e-3, state)
        wall = time.perf_counter() - start
    result = kernel_kinds.summarize(prof, 2, cuda=False, wall_s=wall)
    kinds = result["kinds"]
    assert {"gemm", "swiglu", "cross-entropy"} <= kinds.keys(), kinds.keys()
    assert not any(name.startswith("step ") for _, names in kinds.values() for name, _ in names)
    assert 0 < result["busy_ms"] <= result["wall_ms"] * 1.05 and result["wall_ms"] == pytest.approx(wall * 500)
    assert result["busy_ms"] == pytest.approx(sum(ms for ms, _ in kinds.values()))
    for ms, names in kinds.values():
        times = [t for _, t in names]
        assert ms == pytest.approx(sum(times)) and times == sorted(times, reverse=True)
    lines = kernel_kinds.breakdown_table(result, "2 profiled steps")
    assert lines[0].startswith("2 profiled steps: CPU ops take ") and lines[2].startswith("| kind |")
    rows = [line.split("|")[1].strip() for line in lines[4:]]
    assert set(rows) == kinds.keys() and len(rows) == len(kinds)
    shares = [float(line.split("|")[3].strip(" %")) for line in lines[4:]]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(100, abs=0.1 * len(shares))


def test_a_window_without_kernels_says_so_instead_of_an_idle_device():
    """A machine whose profiler cannot read the GPU's activity records no kernels: not '0 % busy'."""
    empty = {"kinds": {}, "busy_ms": 0.0, "wall_ms": 120.0, "device": "cuda"}
    assert kernel_kinds.breakdown_table(empty, "2 profiled steps") == [
        "2 profiled steps: the profiler recorded no kernels; nothing to break down"]


def test_idle_gaps_are_the_device_waiting_between_kernels():
    """Gaps are measured from the furthest end so far (overlapping kernels hide none), summed per step, and the
    longest are named by their neighbours; a gap under min_us counts as idle but is not listed."""
    kernels = [("a", 0, 10), ("b", 10, 20), ("c", 50, 60), ("d", 55, 70), ("e", 100, 110), ("f", 115, 120),
               ("b", 150, 160), ("c", 190, 200)]  # out of order on purpose: sorted by start inside
    gaps = kernel_kinds.idle_gaps(sorted(kernels, key=lambda k: -k[1]), steps=2)
    assert gaps["idle_ms"] == pytest.approx((30 + 30 + 5 + 30 + 30) / 1e3 / 2)
    assert gaps["waits"] == [(pytest.approx(0.03), 1.0, "b", "c"), (pytest.approx(0.015), 0.5, "d", "e"),
                             (pytest.approx(0.015), 0.5, "f", "b")]
    assert kernel_kinds.idle_gaps([], steps=2) == {"idle_ms": 0.0, "waits": []}


class _Event:
    def __init__(self, name, start, end):
        self.name = self.key = name
        self.device_type = kernel_kinds.DeviceType.CUDA
        self.time_range = type("Interval", (), {"start": start, "end": end})()
        self.self_device_time_total = end - start


def test_a_gpu_window_reports_where_the_device_waited():
    """On CUDA the summary carries the gaps between the profiled kernels, and the table lists them under the
    kinds (a profiler stand-in with two steps of three kernels, the device idle 400 µs before the second
    step's first kernel; the host blocked 1.5 ms per step in the runtime's copy back)."""
    events = [_Event(name, base + start, base + end) for base in (0, 1600)
              for name, start, end in (("Memset (Device)", 400, 500), ("nvjet_gemm", 500, 1500),
                                       ("_adamw_kernel", 1500, 1600))]

    waits = [_Event("cudaMemcpyAsync", 100, 1600), _Event("cudaMemcpyAsync", 1700, 3200),
             _Event("cudaLaunchKernel", 0, 50)]
    for event in waits:
        event.device_type = kernel_kinds.DeviceType.CPU

    class Profiler:
        def key_averages(self):
            return events

        def events(self):
            return events + waits

    result = kernel_kinds.summarize(Profiler(), 2, cuda=True, wall_s=0.004)
    assert result["gaps"] == {"idle_ms": pytest.approx(0.4 / 2), "waits": [(pytest.approx(0.2), 0.5, "_adamw_kernel",
                                                                            "Memset (Device)")]}
    assert result["host_wait_ms"] == pytest.approx(1.5)
    lines = kernel_kinds.breakdown_table(result, "2 profiled steps")
    assert lines[0].endswith("; the host waited 1.5 ms per step in the runtime for the device, so spent 0.5 "
                             "launching and in Python")
    assert "Device idle between its first and last kernel: 0.20 ms per step" in "\n".join(lines)
    assert lines[-1] == "| 0.20 | 0.5 | `_adamw_kernel` | `Memset (Device)` |"
