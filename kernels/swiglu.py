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




@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(out_ptr + offs, _cast(g * s * u, out_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * silu
    tl.store(dg_ptr + offs, _cast(dg, dg_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
    tl.store(du_ptr + offs, _cast(du, du_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


def _launch_config(n: int):
    """Blocks of up to 4096 elements: big enough to amortize indexing, 8 warps at the largest size."""
    block = min(triton.next_power_of_2(max(n, 1)), 4096)
    return block, (8 if block >= 4096 else 4), triton.cdiv(n, block)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward on contiguous inputs; returns out with gate's shape and dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block, warps, programs = _launch_config(n)
        _swiglu_fwd_kernel[(programs,)](
            gate, up, out, n, BLOCK=block, EXACT_BF16=_exact_bf16(gate.dtype), num_warps=warps,
        )
    return out


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Launch the backward on contiguous inputs; returns (dgate, dup)."""
    dy = dy.contiguous()
    dg = torch.empty_like(gate)
    du = torch.empty_like(up)
    n = gate.numel()
    if n:
        block, warps, programs = _launch_config(n)
        _swiglu_bwd_kernel[(programs,)](
            dy, gate, up, dg, du, n, BLOCK=block, EXACT_BF16=_exact_bf16(gate.dtype), num_warps=warps,
        )
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up only; sigmoid(gate) is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        gate = gate.contiguous()
        up = up.contiguous()
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
    if not gate.is_floating_point():
        raise TypeError(f"swiglu: inputs must be floating-point, got {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")
    return SwiGLUFunction.apply(gate, up)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch SwiGLU product, as Llama's MLP writes it."""
    return torch.nn.functional.silu(gate) * up
