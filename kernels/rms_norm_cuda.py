"""RMSNorm through the hand-written CUDA C++ kernels (csrc/rms_norm_cuda.cu), as an autograd op.

Why it exists beside the Triton `rms_norm`: a second, independent implementation of the same math
(`rms_norm_ref` in rms_norm.py) that the benchmark measures against. Nothing in megamath falls back to
it (the model's ops are the Triton kernels or their references), and it is reached through the
`megamath.kernels` package, whose `__init__` imports the Triton kernels. It needs the compiled extension
`megamath.kernels._rms_norm_cuda`, which setup.py builds only when torch with CUDA and nvcc are present
at install time:

    pip install --no-build-isolation -e .

Without it, `rms_norm_cuda` raises ImportError saying how to build it (or, when a build made against
another torch does not load, how to rebuild it); given CPU tensors it raises RuntimeError.
The weight may be x's dtype or float32 (fp32 master weights); y and dx have x's dtype, dweight the
weight's.
"""
from __future__ import annotations

import importlib

import torch

_BUILD_HINT = (
    "megamath.kernels._rms_norm_cuda is not built: reinstall megamath on a machine with a CUDA build of "
    "torch and nvcc, with `pip install --no-build-isolation -e .`"
)
_LOAD_HINT = (
    "megamath.kernels._rms_norm_cuda is built but does not load (built against another torch or CUDA?): "
    "rebuild it with `pip install --no-build-isolation -e .` in this environment"
)


def _extension():
    """The compiled extension, imported on first use so that importing this module never fails."""
    try:
        return importlib.import_module(f"{__package__}._rms_norm_cuda")
    except ModuleNotFoundError as e:
        raise ImportError(f"{_BUILD_HINT} ({e})") from e
    except ImportError as e:  # the .so is there: an undefined symbol, a wrong ELF, ...
        raise ImportError(f"{_LOAD_HINT} ({e})") from e


def is_available() -> bool:
    """True when the extension is built and a CUDA device is present."""
    try:
        _extension()
    except ImportError:
        return False
    return torch.cuda.is_available()


class RMSNormCUDAFunction(torch.autograd.Function):
    """Saves x as (rows, cols), the weight and the fp32 per-row rstd; the backward recomputes x_hat."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ext = _extension()
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, cols); a view when x is contiguous
        y, rstd = ext.forward(x2, weight.contiguous(), float(eps))  # (rows, cols), (rows,) fp32
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()  # (rows, cols)
        dx, dweight = _extension().backward(dy2, x2, weight.contiguous(), rstd)
        return dx.view(ctx.x_shape), dweight, None


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape) with the CUDA C++ kernels.

    Same semantics as `rms_norm_ref`: fp32 statistics, the normalized row rounded to x's dtype, then
    times weight. Differentiable in x and weight.
    """
    _extension()  # an unbuilt extension is the first thing to report
    if x.device.type != "cuda" or weight.device.type != "cuda":
        raise RuntimeError(
            f"rms_norm_cuda: x and weight must be CUDA tensors, got {x.device} and {weight.device}; "
            "use megamath.kernels.rms_norm elsewhere"
        )
    if x.dim() == 0:
        raise ValueError("rms_norm_cuda: x must have at least one dimension")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm_cuda: weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}"
        )
    return RMSNormCUDAFunction.apply(x, weight, eps)
