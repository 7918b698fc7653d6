"""Rotary position embedding (RoPE) for q and k in one launch, Llama's rotate-half convention.

Why a kernel: RoPE is pure memory traffic. Done in torch it reads and writes q and k several times and
keeps a (seq, head_dim) cos/sin cache per call; here one program per block of (batch, position) rows
reads each element of q and k once, writes it once, and computes cos/sin in registers from the position.

Convention (Hugging Face's Llama, which Code Llama and Llemma checkpoints assume): head_dim d is split in
halves and element i is paired with element i + d/2,

    inv_freq[i] = 1 / theta^(2i/d),          angle[p, i] = p * inv_freq[i],       i < d/2
    out[..., i]       = x[..., i] * cos - x[..., i + d/2] * sin
    out[..., i + d/2] = x[..., i + d/2] * cos + x[..., i] * sin

theta is 1e4 for Llemma 7B and 1e6 for Code Llama and Llemma 34B. The backward of a rotation is the
rotation by -angle, so the same kernel with the sign of sin flipped gives dq and dk.

inv_freq (d/2 floats) is computed on the host exactly as Hugging Face does, in fp32, so angles are
bit-identical to the checkpoints' training code (an in-kernel exp2 differs by a few ulp, which at position
p moves the angle by p times that: visible in fp32 from a few hundred positions on). cos and sin are
computed in the kernel after reducing the angle to [-pi, pi], which keeps them accurate at long
context whichever sin/cos instruction the GPU backend picks.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import triton
import triton.language as tl

from ._interpreter import cast_rne as _cast
from ._interpreter import exact_bf16 as _exact_bf16
from ._layout import empty_like_order

# 2*pi split in three parts (Cody-Waite): k * _TWO_PI_A (8 significant bits) is exact in fp32 for the
# multiples k of 2*pi below 2^24 / 201, k * _TWO_PI_B (11 bits) below 2^13, so the reduced angle keeps
# ~1e-7 absolute accuracy up to ~50k rad and ~1.5e-5 up to 2^19 rad. Past that k * _TWO_PI_A rounds and
# cos/sin are off by up to ~0.1: angle = position * inv_freq[0] = position, hence MAX_POSITION.
_TWO_PI_A = 6.28125
_TWO_PI_B = 0.0019350051879882812
_TWO_PI_C = 3.0199159795074593e-07
MAX_POSITION = 1 << 19  # positions (offset + seq) the angle reduction keeps accurate; larger ones are refused
_INV_TWO_PI = 1.0 / (2.0 * math.pi)
_INT32_MAX = 2**31 - 1  # largest head offset the kernel's int32 head arithmetic reaches without wrapping
# Elements per half-tile (positions x heads x head_dim/2) of one program.
_TILE = 4096


@triton.jit
def _rotate_heads(x_ptr, out_ptr, x_rows, out_rows, row_mask, n_heads, stride_h, stride_out_h, cos, sin,
                  d, d_mask, HALF: tl.constexpr, BLOCK_H: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Rotate all heads of a block of (batch, position) rows; x_rows/out_rows: (BLOCK_S,) row offsets."""
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        mask = row_mask[:, None, None] & (h < n_heads)[None, :, None] & d_mask[None, None, :]  # (S, H, D)
        x_off = x_rows[:, None, None] + h[None, :, None] * stride_h + d[None, None, :]
        o_off = out_rows[:, None, None] + h[None, :, None] * stride_out_h + d[None, None, :]
        x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)  # first half
        x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)  # second half
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(out_ptr + o_off, _cast(o1, out_ptr.dtype.element_ty, EXACT_BF16), mask=mask)
        tl.store(out_ptr + o_off + HALF, _cast(o2, out_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, inv_freq_ptr,
    n_rows, seq_len, n_q_heads, n_kv_heads, position_offset,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    TWO_PI_A: tl.constexpr, TWO_PI_B: tl.constexpr, TWO_PI_C: tl.constexpr, INV_TWO_PI: tl.constexpr,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, SIN_SIGN: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """One program per BLOCK_S (batch, position) rows: all their q heads, then all k heads, one cos/sin."""
    # int64: offsets of large activations overflow int32.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) over batch*seq
    row_mask = rows < n_rows
    b = rows // seq_len
    s = rows % seq_len
    d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) index into the first half
    d_mask = d < HALF
    inv_freq = tl.load(inv_freq_ptr + d, mask=d_mask, other=0.0)  # (BLOCK_D,) fp32
    # Same fp32 product as the reference: positions are exact in fp32 below 2^24.
    angle = (s + position_offset).to(tl.float32)[:, None] * inv_freq[None, :]  # (BLOCK_S, BLOCK_D)
    # Reduce to [-pi, pi]; angle >= 0, so truncation is floor.
    k = (angle * INV_TWO_PI + 0.5).to(tl.int32).to(tl.float32)
    r = ((angle - k * TWO_PI_A) - k * TWO_PI_B) - k * TWO_PI_C
    cos = tl.cos(r)[:, None, :]  # (BLOCK_S, 1, BLOCK_D)
    sin = (SIN_SIGN * tl.sin(r))[:, None, :]
    _rotate_heads(q_ptr, q_out_ptr, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, row_mask,
                  n_q_heads, stride_qh, stride_qoh, cos, sin, d, d_mask, HALF, BLOCK_HQ, EXACT_BF16)
    _rotate_heads(k_ptr, k_out_ptr, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, row_mask,
                  n_kv_heads, stride_kh, stride_koh, cos, sin, d, d_mask, HALF, BLOCK_HK, EXACT_BF16)


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Hugging Face Llama's inv_freq, computed once per (head_dim, theta, device): (head_dim/2,) fp32.

    Cached so that a training step does not launch its tiny construction kernels once per layer.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (d/2,)
    return (1.0 / (theta ** exponent)).to(device)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, theta: float, position_offset: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"rope expects q (batch, seq, q_heads, head_dim) and k (batch, seq, kv_heads, head_dim), "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"rope: q and k must share batch, seq and head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[3] % 2 != 0:
        raise ValueError(f"rope: head_dim must be even, got {q.shape[3]}")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"rope: q and k must share dtype and device, got {q.dtype} on {q.device} "
                         f"and {k.dtype} on {k.device}")
    if not q.is_floating_point():
        raise ValueError(f"rope: q and k must be floating point, got {q.dtype}")
    if not theta > 0:  # also refuses NaN, which would turn every output into NaN
        raise ValueError(f"rope: theta must be positive, got {theta}")
    try:
        position_offset = operator.index(position_offset)  # int, NumPy or 0-d integer tensor; not a float
    except TypeError:
        raise ValueError(f"rope: position_offset must be an integer, got {position_offset!r}") from None
    if position_offset < 0:
        raise ValueError(f"rope: position_offset must be >= 0, got {position_offset}")
    if position_offset + q.shape[1] > MAX_POSITION:
        raise ValueError(f"rope: positions {position_offset}..{position_offset + q.shape[1] - 1} exceed the "
                         f"supported maximum {MAX_POSITION - 1} (fp32 angle reduction)")


def _kernel_can_read(x: torch.Tensor) -> bool:
    # Heads and positions may be strided (views of a fused qkv projection); the head dim must not be. The
    # kernel offsets (batch, position) rows in int64 but heads in int32 (int64 would cost address arithmetic
    # in every tile), so a view whose heads lie 2^31 or more elements apart (a (B, H, S, D) tensor of that
    # size, transposed) must be copied, to heads head_dim apart, rather than read at wrapped addresses.
    return x.stride(-1) == 1 and (x.shape[2] - 1) * x.stride(2) <= _INT32_MAX


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x as it is where the kernel can read it in place (_kernel_can_read), else a contiguous copy."""
    return x if _kernel_can_read(x) else x.contiguous()


def _rope_launch(q: torch.Tensor, k: torch.Tensor, theta: float, position_offset: int, sin_sign: float,
                 in_place: bool = False):
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) by +angle (sin_sign 1) or -angle (-1) into new tensors, or
    with in_place into q and k themselves (each program loads an element pair before it stores it)."""
    if in_place:
        q_out, k_out = q, k
    else:
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        q_out = empty_like_order(q)  # (B, S, Hq, D), dense, batch or sequence major as q is
        k_out = empty_like_order(k)  # (B, S, Hk, D), dense, batch or sequence major as k is
    batch, seq, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    half = head_dim // 2
    n_rows = batch * seq
    block_d = triton.next_power_of_2(half)
    # Tiles of at most ~4k elements per half keep the two fp32 halves in registers for any head count;
    # small heads take several positions per program so that each program moves a useful amount.
    max_heads = max(1, _TILE // block_d)
    block_hq = min(triton.next_power_of_2(max(n_q_heads, 1)), max_heads)
    block_hk = min(triton.next_power_of_2(max(n_kv_heads, 1)), max_heads)
    block_s = min(max(1, _TILE // (block_hq * block_d)), triton.next_power_of_2(n_rows))
    tile = block_s * block_hq * block_d
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    _rope_kernel[(triton.cdiv(n_rows, block_s),)](
        q, k, q_out, k_out, _inv_freq(head_dim, float(theta), q.device),
        n_rows, seq, n_q_heads, n_kv_heads, position_offset,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        TWO_PI_A=_TWO_PI_A, TWO_PI_B=_TWO_PI_B, TWO_PI_C=_TWO_PI_C, INV_TWO_PI=_INV_TWO_PI,
        HALF=half, BLOCK_D=block_d, BLOCK_S=block_s, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        SIN_SIGN=sin_sign, EXACT_BF16=_exact_bf16(q.dtype), num_warps=num_warps,
    )
    return q_out, k_out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, theta, position_offset):
        ctx.theta, ctx.position_offset = theta, position_offset
        return _rope_launch(q, k, theta, position_offset, 1.0)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        # A rotation's transpose is the rotation by -angle; autograd materializes unused grads as zeros.
        dq, dk = _rope_launch(dq_out, dk_out, ctx.theta, ctx.position_offset, -1.0)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, theta: float = 10000.0,
         position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to q (B, S, Hq, D) and k (B, S, Hk, D); returns new (q_out, k_out).

    Position of q[:, s] is s + position_offset. Differentiable in q and k; not in place.
    """
    _check_inputs(q, k, theta, position_offset)
    return _RoPE.apply(q, k, float(theta), operator.index(position_offset))


def rope_(q: torch.Tensor, k: torch.Tensor, theta: float = 10000.0, position_offset: int = 0,
          inverse: bool = False) -> None:
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) in place, by -angle with `inverse` (a rotation's transpose:
    the backward). Not differentiable: for a caller that owns the memory inside its own autograd function,
    as the fused q/k/v projection does (megamath.parallel.fused_linear), so that its pre-RoPE q and k are not
    kept beside rotated copies. q and k must not overlap, and each head's head_dim must be contiguous."""
    _check_inputs(q, k, theta, position_offset)
    for name, t in (("q", q), ("k", k)):
        if not _kernel_can_read(t):
            raise ValueError(f"rope_: {name} {tuple(t.shape)} with strides {t.stride()} cannot be rotated in place "
                             "(its head_dim is not contiguous, or its heads lie 2^31 elements apart)")
    _rope_launch(q, k, float(theta), operator.index(position_offset), -1.0 if inverse else 1.0, in_place=True)


def rope_ref(q: torch.Tensor, k: torch.Tensor, theta: float = 10000.0,
             position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference: Hugging Face Llama's rotate_half formula, computed in fp32, cast back.

    Hugging Face computes the products in the input dtype; the kernel computes in fp32 and rounds once,
    and so does this reference, so that the kernel is held to the tighter bar.
    """
    seq, head_dim = q.shape[1], q.shape[3]
    inv_freq = _inv_freq(head_dim, float(theta), q.device)  # (D/2,)
    pos = torch.arange(position_offset, position_offset + seq, dtype=torch.float32, device=q.device)  # (S,)
    angle = pos[:, None] * inv_freq[None, :]  # (S, D/2)
    emb = torch.cat([angle, angle], dim=-1)  # (S, D)
    cos = emb.cos()[None, :, None, :]  # (1, S, 1, D)
    sin = emb.sin()[None, :, None, :]

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + rotate_half(q32) * sin  # (B, S, Hq, D)
    k_out = k32 * cos + rotate_half(k32) * sin  # (B, S, Hk, D)
    return q_out.to(q.dtype), k_out.to(k.dtype)
