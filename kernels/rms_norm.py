"""RMSNorm over the last dimension: one fused pass forward, one fused pass backward.

    y = cast(x * rstd) * weight,    rstd = 1 / sqrt(mean(x², -1) + eps)

Order of operations is Llama/HF's: the statistics and the normalization are computed in fp32, the
normalized row is rounded to x's dtype, and only then multiplied by the weight (the product is rounded
to x's dtype again). Kernel and `rms_norm_ref` follow the same order, so in fp32 they agree to rounding
and in bf16/fp16 the kernel rounds exactly where plain torch does.

Why a kernel: unfused, torch makes an fp32 copy of x and several intermediates of its size. Here the
forward reads x and weight once and writes y plus one fp32 `rstd` per row; the backward reads x, dy,
rstd once, writes dx, and reduces dweight through fp32 per-program partial sums (a (programs, N) buffer,
never an fp32 copy of x) followed by one small sum, whose fp32 result a caller may take before it is rounded
to the weight's dtype (`weight_grad_sink`: an optimizer's fp32 gradient buffer).

    h, y = add_rms_norm(residual, delta, weight, eps)     h = residual + delta,  y = rms_norm(h)

the pre-norm block's residual add fused in: the forward reads residual and delta and writes h and y (the
add alone would write h and the norm read it back), and the backward adds the gradient arriving at h to
the norm's dx before its one rounding, where autograd would write dx and then read it again to add the
two (h feeds both the norm and the next residual add). Per norm of a (tokens, h) bf16 stream that is one
read fewer forward and a read and a write fewer backward; at Code Llama 7B's width and S 4096, ~0.1 GB per
norm per micro-batch (arithmetic, not a timing). h is rounded to the dtype before it is normalized, as
the unfused add then norm does.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from ._interpreter import cast_rne as _cast
from ._interpreter import exact_bf16 as _exact_bf16
from ._layout import rows_2d

MAX_WIDTH = 65536  # one row per program lives in registers; beyond this the block no longer fits




@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, delta_ptr, h_ptr, w_ptr, y_ptr, rstd_ptr,
    x_row_stride, delta_row_stride, h_row_stride, y_row_stride, N, eps,
    BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr, ADD: tl.constexpr,
):
    """With ADD, x is the residual: h = x + delta is written (rounded to its dtype) and normalized."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    if ADD:
        delta = tl.load(delta_ptr + row * delta_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = _cast(x + delta, h_ptr.dtype.element_ty, EXACT_BF16)  # (BLOCK,): rounded as torch's add rounds
        tl.store(h_ptr + row * h_row_stride + cols, h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    # Round the normalized row to the output dtype before the weight multiply (HF's order).
    x_hat = _cast(x * rstd, y_ptr.dtype.element_ty, EXACT_BF16).to(tl.float32)
    y = _cast(x_hat * w, y_ptr.dtype.element_ty, EXACT_BF16)
    tl.store(y_ptr + row * y_row_stride + cols, y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dres_ptr, dx_ptr, dw_partial_ptr,
    dy_row_stride, x_row_stride, dres_row_stride, dx_row_stride, M, N, rows_per_program,
    BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr, ADD_GRAD: tl.constexpr,
):
    """Each program walks a contiguous range of rows and keeps its dweight share in fp32 registers.

    dx = rstd * (g - x_hat * mean(g * x_hat)),  g = dy * w,  x_hat = x * rstd   (+ dres with ADD_GRAD: the
                                                                               gradient arriving at x too)
    dw_partial[pid] = sum over its rows of dy * cast(x_hat)   (the value the forward multiplied by w)

    The weight is read again for every row (from L1/L2, not HBM) rather than held: registers, not bandwidth,
    bound how many rows an SM has in flight here, and a held fp32 weight costs a row's worth of them.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds give an int64 loop variable
    row_end = tl.minimum(row_start + rows_per_program, M)
    # The next row's x and dy are loaded before this row's reduction waits: two rows in flight per program.
    # (A row past the program's range is masked off whole: its width counts as 0.)
    mask_next = cols < tl.where(row_start < row_end, N, 0)
    x_next = tl.load(x_ptr + row_start * x_row_stride + cols, mask=mask_next, other=0.0)
    dy_next = tl.load(dy_ptr + row_start * dy_row_stride + cols, mask=mask_next, other=0.0)
    for row in range(row_start, row_end):
        x, dy = x_next.to(tl.float32), dy_next.to(tl.float32)  # (BLOCK,)
        mask_next = cols < tl.where(row + 1 < row_end, N, 0)
        x_next = tl.load(x_ptr + (row + 1) * x_row_stride + cols, mask=mask_next, other=0.0)
        dy_next = tl.load(dy_ptr + (row + 1) * dy_row_stride + cols, mask=mask_next, other=0.0)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        g = dy * w
        dot = tl.sum(g * x_hat, axis=0) / N
        dx = rstd * (g - x_hat * dot)
        if ADD_GRAD:
            dx += tl.load(dres_ptr + row * dres_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * dx_row_stride + cols, _cast(dx, dx_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
        dw_acc += dy * _cast(x_hat, x_ptr.dtype.element_ty, EXACT_BF16).to(tl.float32)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)


def _num_warps(block: int) -> int:
    """Enough warps that each thread holds a handful of elements of the row."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _check(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> None:
    """One-line errors for what the kernels cannot take: x and weight (and delta, with the residual add)."""
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"rms_norm: weight must have shape ({n},) to match x's last dim, got {tuple(weight.shape)}")
    if weight.is_complex():  # Triton has no complex type: the launch would fail on a KeyError
        raise TypeError(f"rms_norm: weight must be a real tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if n > MAX_WIDTH:
        raise ValueError(f"rms_norm: row width {n} exceeds the supported maximum {MAX_WIDTH}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device):
        raise ValueError(f"add_rms_norm: delta must match residual's shape, dtype and device, got "
                         f"{tuple(delta.shape)} {delta.dtype} on {delta.device} for {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """Launch the forward; returns y (x's shape and dtype), the normalized rows as (M, N) (x, or with `delta`
    the new h = x + delta), rstd (M,) fp32."""
    n = x.shape[-1]
    x2 = rows_2d(x)  # (M, N)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    delta2 = x2 if delta is None else rows_2d(delta)  # (M, N)
    h = x2 if delta is None else torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)
    if m > 0 and n > 0:
        block = triton.next_power_of_2(n)
        _rms_norm_fwd_kernel[(m,)](
            x2, delta2, h, weight, y, rstd, x2.stride(0), delta2.stride(0), h.stride(0), y.stride(0), n, eps,
            BLOCK=block, EXACT_BF16=_exact_bf16(x.dtype), ADD=delta is not None, num_warps=_num_warps(block),
        )
    return y.view(x.shape), h, rstd


def _bwd_launch(block: int) -> tuple[int, int]:
    """(num_warps, programs per SM) of the backward. Registers, not bandwidth, bound the rows an SM has in
    flight, two per program (the prefetch). 8 elements of a row per thread (one 16-byte bf16 access): at
    width 4096, 16 warps and ~64 registers (Triton 3.9, sm_90a), so two programs fill the register file.
    Measured on an H200 (16384 x 4096 bf16, the kernel launch alone, perf/bench_kernels.py): 0.117 ms,
    3.4 TB/s, against 0.119 at 8 warps x 2 per SM, 0.126 at 16 x 4 and 0.142 at 32 x 1, and 0.143 for our
    CUDA C++ backward; the launch before (8 warps, ~120 registers, no prefetch) ran at 1.2 TB/s. For an A100
    Triton 3.6 (the GPU image's) also compiles it to 64 registers, two programs per SM; Triton 3.9 to ~80,
    one (not timed on an A100)."""
    return max(4, min(32, block // 256)), 2


def _bwd_programs(m: int, device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        return max(1, min(m, per_sm * _sm_count(device)))
    return max(1, min(m, 8))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """The device's SM count, asked once: every backward launch sizes its grid by it."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm_bwd(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dres: torch.Tensor | None = None):
    """Launch the backward; returns dx (M, N) in x's dtype (plus `dres`, x's shape, added before the rounding)
    and dweight (N,) in fp32: the programs' fp32 partial sums summed, not yet rounded to weight's dtype."""
    m, n = x2.shape
    dy2 = rows_2d(dy)  # (M, N)
    dres2 = dy2 if dres is None else rows_2d(dres)  # (M, N)
    dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return dx, torch.zeros(n, dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(n)
    num_warps, per_sm = _bwd_launch(block)
    programs = _bwd_programs(m, x2.device, per_sm)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)  # (P, N)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dres2, dx, dw_partial,
        dy2.stride(0), x2.stride(0), dres2.stride(0), dx.stride(0), m, n, rows_per_program,
        BLOCK=block, EXACT_BF16=_exact_bf16(x2.dtype), ADD_GRAD=dres is not None, num_warps=num_warps,
    )
    return dx, dw_partial.sum(0)  # (N,) fp32


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x), or with `delta` (h, y) = (x + delta, rms_norm(h)). Saves the normalized rows (x as given,
    no copy, or h) and the fp32 per-row rstd, and recomputes x_hat in the backward. With the add, the gradient of
    both inputs is one tensor: the norm's dx plus the gradient arriving at h, summed in the kernel. The weight's
    fp32 gradient goes to `weight_grad_sink` first, when there is one (`rms_norm`)."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps, weight_grad_sink):
        weight = weight.contiguous()  # the kernels index weight as w_ptr + col: a strided view would be misread
        y, h2, rstd = rms_norm_fwd(x, weight, eps, delta=delta)
        ctx.save_for_backward(h2, weight, rstd)
        ctx.add, ctx.sink = delta is not None, weight_grad_sink
        if delta is None:
            return y
        ctx.set_materialize_grads(False)  # an unused h (the last norm's) sends None, not zeros to read
        return h2.view(x.shape), y

    @staticmethod
    def backward(ctx, *grads):
        dh, dy = grads if ctx.add else (None, grads[0])
        if dy is None:  # only h was used: the add's backward alone
            return dh, dh, None, None, None
        h2, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_bwd(dy, h2, weight, rstd, dres=dh)
        dx = dx.view(dy.shape)
        taken = ctx.sink is not None and ctx.sink(dweight)
        return dx, dx if ctx.add else None, None if taken else dweight.to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             weight_grad_sink: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape); output has x's shape and dtype.

    Differentiable in x and weight. Statistics in fp32; see the module docstring for the rounding order.
    `weight_grad_sink`, when given, is called in the backward with the weight's gradient as its fp32 sum (N,),
    before any rounding; returning True means it took it (say, added it to an fp32 gradient buffer, as
    megamath's ZeRO-1 does: megamath.parallel.grad_into_buffer) and autograd gets None for the weight, False
    that autograd gets it, rounded to the weight's dtype as without a sink.
    """
    _check(x, weight)
    return RMSNormFunction.apply(x, None, weight, eps, weight_grad_sink)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain-torch RMSNorm in Llama/HF's order: fp32 statistics, cast to x's dtype, then times weight."""
    x32 = x.float()
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x_hat.to(x.dtype) * weight).to(x.dtype)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                 weight_grad_sink: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = residual + delta (residual's shape and dtype), y = rms_norm(h, weight, eps), in one pass each
    way (the module docstring). Differentiable in residual, delta and weight; `weight_grad_sink` as rms_norm's."""
    _check(residual, weight, delta)
    return RMSNormFunction.apply(residual, delta, weight, eps, weight_grad_sink)


def add_rms_norm_ref(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the add, then rms_norm_ref of its result (what the unfused block computes)."""
    h = residual + delta
    return h, rms_norm_ref(h, weight, eps)
