"""The CUDA C++ RMSNorm: it compiles with bare nvcc (no torch headers), and on a GPU with the extension
built, forward and backward match `rms_norm_ref` under the three-way tolerance.

The compile test runs wherever nvcc is on PATH (no GPU needed); the numeric tests need a GPU and the
extension built by `pip install --no-build-isolation -e .`, and skip with that reason otherwise.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kernel_tolerance import assert_close_3way

from megamath.kernels import rms_norm_cuda as rms_cuda_mod
from megamath.kernels.rms_norm import rms_norm_ref
from megamath.kernels.rms_norm_cuda import rms_norm_cuda

REPO = Path(__file__).resolve().parents[1]
CU_SOURCE = REPO / "csrc" / "rms_norm_cuda.cu"


def _extension_built() -> bool:
    try:
        rms_cuda_mod._extension()
    except ImportError:
        return False
    return True


needs_gpu_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension_built()),
    reason="needs a CUDA GPU and the extension megamath.kernels._rms_norm_cuda "
    "(built by `pip install --no-build-isolation -e .` on a CUDA machine)",
)


# ----------------------------------------------------------------------------------------------------
# Build: the kernel file stands alone.


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cu_file_compiles_with_bare_nvcc(tmp_path):
    obj = tmp_path / "rms_norm_cuda.o"
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "-o", str(obj), str(CU_SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr}"
    assert obj.stat().st_size > 0
    if shutil.which("nm") is None:
        return
    symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    # The launchers the torch binding declares (C++ linkage, so a drifted signature fails at link time).
    for name in ("megamath_rms::rms_norm_forward(", "megamath_rms::rms_norm_backward(",
                 "megamath_rms::rms_norm_backward_num_partials("):
        assert any(name in line and " T " in line for line in symbols.splitlines()), f"{name} not defined"


def test_unbuilt_extension_raises_import_error_with_build_hint():
    if _extension_built():
        pytest.skip("the extension is built here, so the unbuilt path cannot be exercised")
    x = torch.randn(2, 8)
    with pytest.raises(ImportError) as info:
        rms_norm_cuda(x, torch.ones(8))
    assert str(info.value).startswith(
        "megamath.kernels._rms_norm_cuda is not built: reinstall megamath on a machine with a CUDA build of "
        "torch and nvcc, with `pip install --no-build-isolation -e .` ("
    )
    assert rms_cuda_mod.is_available() is False


def test_a_build_that_does_not_load_asks_for_a_rebuild(monkeypatch):
    # A .so left by another torch: "not built" would be untrue, and the loader's error alone says no remedy.
    def undefined_symbol(name):
        raise ImportError(f"{name}.so: undefined symbol: _ZN3c104cuda20getCurrentCUDAStreamEa")

    monkeypatch.setattr(rms_cuda_mod, "importlib", SimpleNamespace(import_module=undefined_symbol))
    with pytest.raises(ImportError, match=r"is built but does not load .*: rebuild it .*undefined symbol"):
        rms_norm_cuda(torch.randn(2, 8), torch.ones(8))
    assert rms_cuda_mod.is_available() is False


# ----------------------------------------------------------------------------------------------------
# Numerics on a GPU. Widths: 1000 (16-byte vectors), 1001 (scalar path), 4096 (Llama-7B), 16384
# (widest cached backward for 2-byte types), 40000 (the looping kernels).

SHAPES = [(3, 1000), (5, 1001), (129, 4096), (2, 3, 16384), (3, 40000), (1, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check_fwd_bwd(x, w, eps=1e-5, view=lambda t: t):
    """Kernel vs rms_norm_ref on view(x); gradients are taken on the leaf x, so `view` can hand the
    kernel a misaligned or strided tensor that a clone would not preserve."""
    gen = torch.Generator(device=x.device).manual_seed(1)
    dy = torch.randn(view(x).shape, generator=gen, device=x.device, dtype=x.dtype)

    x_k, w_k = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm_cuda(view(x_k), w_k, eps)
    dx, dw = torch.autograd.grad(y, (x_k, w_k), dy)

    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    y32 = rms_norm_ref(view(x32), w32, eps)
    dx32, dw32 = torch.autograd.grad(y32, (x32, w32), dy.float())

    x_lp, w_lp = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_lp = rms_norm_ref(view(x_lp), w_lp, eps)
    dx_lp, dw_lp = torch.autograd.grad(y_lp, (x_lp, w_lp), dy)

    assert y.dtype == x.dtype and y.shape == view(x).shape
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close_3way(y, y32, y_lp, name="y")
    assert_close_3way(dx, dx32, dx_lp, name="dx")
    # dweight sums over rows: in fp32 scale atol with the sum's magnitude (as tests/test_rms_norm.py);
    # an fp32 weight beside low-precision x is judged with bf16's atol, the x_hat it sums being rounded.
    if w.dtype != torch.float32:
        dw_atol = None
    elif x.dtype == torch.float32:
        dw_atol = 1e-5 * max(1.0, dw32.abs().max().item())
    else:
        dw_atol = 1e-2 * max(1.0, dw32.abs().max().item())
    assert_close_3way(dw, dw32, dw_lp, atol=dw_atol, name="dweight")


@needs_gpu_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(sum(shape) * 3 + DTYPES.index(dtype))
    x = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen, device="cuda", dtype=dtype)
    _check_fwd_bwd(x, w)


@needs_gpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(129, 4096), (5, 1001), (3, 40000)], ids=lambda s: "x".join(map(str, s)))
def test_fp32_weight_with_low_precision_x(shape, dtype):
    """fp32 master weights under autocast: y and dx in x's dtype, dweight in fp32."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen, device="cuda", dtype=torch.float32)
    _check_fwd_bwd(x, w)


@needs_gpu_ext
def test_unaligned_and_strided_inputs():
    """A view starting one element in (not 16-byte aligned) takes the scalar path; a transposed view
    is copied to rows first. Gradients flow back to the base tensors."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    base = torch.randn(17 * 1024 + 1, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, generator=gen, device="cuda", dtype=torch.bfloat16)
    _check_fwd_bwd(base, w, view=lambda t: t[1:].view(17, 1024))
    x = torch.randn(64, 33, generator=gen, device="cuda", dtype=torch.float16)
    _check_fwd_bwd(x, torch.randn(64, generator=gen, device="cuda", dtype=torch.float16), view=lambda t: t.t())


@needs_gpu_ext
def test_empty_rows_give_zero_dweight():
    x = torch.randn(0, 64, device="cuda", requires_grad=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    y = rms_norm_cuda(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert y.shape == (0, 64) and dx.shape == (0, 64)
    assert torch.equal(dw, torch.zeros_like(w))


@needs_gpu_ext
def test_bad_inputs_give_clear_errors():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"^rms_norm_cuda: x and weight must be CUDA tensors, got cuda:0 and cpu; "
                       r"use megamath.kernels.rms_norm elsewhere$"):
        rms_norm_cuda(x, torch.ones(64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"^rms_norm_cuda: weight must have shape \(64,\) to match x's last dim, "
                       r"got \(63,\)$"):
        rms_norm_cuda(x, torch.ones(63, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"rms_norm_cuda: weight's dtype must be x's \(BFloat16\) or float32, "
                       r"got Half"):
        rms_norm_cuda(x, torch.ones(64, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"rms_norm_cuda: dtype must be float32, float16 or bfloat16, got Double"):
        rms_norm_cuda(x.double(), torch.ones(64, device="cuda", dtype=torch.float64))
