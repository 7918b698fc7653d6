"""SwiGLU's gating product, silu(gate) * up, as one elementwise pass each way.

    out = silu(g) * u,            silu(g) = g * sigmoid(g)
    dg  = dy * u * s * (1 + g * (1 - s)),   s = sigmoid(g)
    du  = dy * silu(g)

Why a kernel: in Llama's MLP, gate and up are the two (tokens, ffn) activations, the largest tensors of
the layer. Plain torch writes silu(g) as an intermediate of that size and keeps it for backward; here the
forward reads g and u once and writes out, the backward recomputes sigmoid from g (only the inputs are
saved) and writes dg and du in the same pass. Math in fp32, one rounding at each store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import cast_rne as _cast
from ._interpreter import exact_bf16 as _exact_bf16
from ._layout import empty_siblings


@triton.jit
def _element_offsets(BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """This program's (BLOCK,) element indices: int64 when some offset reaches 2^31 (WIDE), else int32, which
    halves the registers every index vector takes (the backward then fits 5 blocks per SM instead of 4)."""
    if WIDE:
        return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, n, n_cols, stride_g, stride_u, BLOCK: tl.constexpr,
                       WIDE: tl.constexpr, EXACT_BF16: tl.constexpr):
    offs = _element_offsets(BLOCK, WIDE)  # (BLOCK,) index into the output
    mask = offs < n
    row = offs // n_cols
    col = offs - row * n_cols
    g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(out_ptr + offs, _cast(g * s * u, out_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, n_cols, stride_g, stride_u, BLOCK: tl.constexpr,
    GRADS_LIKE_INPUTS: tl.constexpr, WIDE: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """dg and du at gate's and up's own offsets (GRADS_LIKE_INPUTS: the halves of one fused gradient), else
    contiguous; one offset computation serves both the loads and the stores either way."""
    offs = _element_offsets(BLOCK, WIDE)  # (BLOCK,) index into dy
    mask = offs < n
    row = offs // n_cols
    col = offs - row * n_cols
    g_offs, u_offs = row * stride_g + col, row * stride_u + col
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + u_offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * silu
    if GRADS_LIKE_INPUTS:
        tl.store(dg_ptr + g_offs, _cast(dg, dg_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
        tl.store(du_ptr + u_offs, _cast(du, du_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
    else:
        tl.store(dg_ptr + offs, _cast(dg, dg_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
        tl.store(du_ptr + offs, _cast(du, du_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


_INT32_MAX = 2**31 - 1


def _wide(n: int, block: int, n_cols: int, *row_strides: int) -> bool:
    """Whether an index or offset the kernels compute reaches 2^31: the element indices of every block (the
    last block's masked lanes included) and, through their rows (n_cols elements each), the offsets in tensors
    whose rows lie `row_strides` apart. If so they index in int64 (_element_offsets)."""
    indexed = triton.cdiv(n, block) * block
    rows = triton.cdiv(indexed, max(n_cols, 1))
    return max([indexed] + [(rows - 1) * stride + n_cols for stride in row_strides]) > _INT32_MAX


def _launch_config(n: int):
    """Blocks of up to 4096 elements: big enough to amortize indexing, 8 warps at the largest size."""
    block = min(triton.next_power_of_2(max(n, 1)), 4096)
    return block, (8 if block >= 4096 else 4), triton.cdiv(n, block)


def _row_stride(x: torch.Tensor) -> int | None:
    """The element distance between consecutive rows (..., f) of x when its rows are evenly spaced and each
    row is contiguous, else None (then x is copied)."""
    if x.dim() == 0 or (x.stride(-1) != 1 and x.shape[-1] > 1):
        return None
    lead = [(x.shape[i], x.stride(i)) for i in range(x.dim() - 1) if x.shape[i] > 1]  # non-singleton row dims
    if not lead:
        return x.shape[-1]
    row = lead[-1][1]
    expected = row
    for size, stride in reversed(lead):  # the leading dims must flatten onto one evenly spaced row index
        if stride != expected:
            return None
        expected = stride * size
    return row if row >= x.shape[-1] else None


def _width(x: torch.Tensor) -> int:
    """Elements per row: the last dim, or 1 for a 0-d tensor (one row of one element)."""
    return x.shape[-1] if x.dim() else 1


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x or a contiguous copy of it, its row stride)."""
    stride = _row_stride(x)
    if stride is None:
        x = x.contiguous()
        stride = x.shape[-1] if x.dim() else 1
    return x, stride


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward on row-strided inputs (see the module docstring); returns a contiguous out."""
    gate, stride_g = _rows(gate)
    up, stride_u = _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        block, warps, programs = _launch_config(n)
        _swiglu_fwd_kernel[(programs,)](
            gate, up, out, n, _width(gate), stride_g, stride_u, BLOCK=block,
            WIDE=_wide(n, block, _width(gate), stride_g, stride_u), EXACT_BF16=_exact_bf16(gate.dtype),
            num_warps=warps,
        )
    return out


def _grad_buffers(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(dgate, dup, whether they lie as gate and up do). gate and up are row-strided (_rows). When they are the
    two halves of one fused gate/up projection, dgate and dup are the halves of one new tensor laid out the
    same way (empty_siblings): the fused matmul's backward then takes it as its gradient as it is, with no
    concatenating copy. Else two tensors in their inputs' layout where that is dense, or contiguous."""
    dg, du = empty_siblings((gate, up))  # not siblings: each dense (N, f), i.e. contiguous
    return dg, du, dg.stride() == gate.stride() and du.stride() == up.stride()  # gate's and up's offsets fit


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Launch the backward on row-strided gate and up; returns (dgate, dup), contiguous or, for the halves of
    one fused projection, the halves of one new tensor (_grad_buffers)."""
    dy = dy.contiguous()
    gate, stride_g = _rows(gate)
    up, stride_u = _rows(up)
    dg, du, like_inputs = _grad_buffers(gate, up)
    n = gate.numel()
    if n:
        block, warps, programs = _launch_config(n)
        _swiglu_bwd_kernel[(programs,)](
            dy, gate, up, dg, du, n, _width(gate), stride_g, stride_u, BLOCK=block, GRADS_LIKE_INPUTS=like_inputs,
            WIDE=_wide(n, block, _width(gate), stride_g, stride_u), EXACT_BF16=_exact_bf16(gate.dtype),
            num_warps=warps,
        )
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up only (row-strided views are kept as they are); sigmoid(gate) is recomputed."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, _ = _rows(gate)
        up, _ = _rows(up)
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up elementwise; gate and up must have the same shape, dtype and device.

    No broadcasting: in the MLP both come from the same input, so a shape mismatch is a bug upstream.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # computed in fp32: float64 would lose digits
        raise TypeError(f"swiglu: inputs must be float32, bfloat16 or float16, got {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")
    return SwiGLUFunction.apply(gate, up)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch SwiGLU product, as Llama's MLP writes it."""
    return torch.nn.functional.silu(gate) * up
