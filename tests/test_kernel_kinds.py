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
