"""Flash attention (causal or not, grouped-query heads): FlashAttention-2 forward and exact backward.

    O = softmax(scale · Q Kᵀ + mask) V,   per (batch, q head h), with K, V of kv head h // (H / H_kv)

Why a kernel: plain attention writes an (S, S) score matrix per head to memory and reads it back twice.
Here the forward streams K/V blocks past a block of queries, keeping the softmax online in fp32 registers
(running max m, running sum l, exp2 with log2(e) folded into the scale), and writes only O and the
logsumexp (fp32, (B, H, S)). The backward recomputes P = exp(scale · Q Kᵀ - lse) block by block:
  delta = rowsum(dO ∘ O)                      (preprocess kernel, fp32)
  dV = Pᵀ dO,  dS = P ∘ (dO Vᵀ - delta),  dK = scale · dSᵀ Q   (one program per kv block and kv head)
  dQ = scale · dS K                           (one program per q block and q head; or, with the
                                              `bwd_atomic_dq` tiles, added by the dK/dV programs into
                                              an fp32 buffer with atomics, P and dP computed once)
The dK/dV program loops over the q heads of its GQA group, so a kv head's gradients accumulate in
registers (no atomics for them), and K/V are never repeated in memory (the kernel indexes the kv head).

Layout is the model's (batch, seq, heads, head_dim); strides are passed explicitly so views of a fused
QKV projection work without copies (only a non-unit head_dim stride forces a copy). Causal blocks above
the diagonal are skipped; the mask is applied only on the diagonal (and sequence-tail) blocks.
On Hopper, tiles with `fwd_tma` / `bwd_tma` read the loops' K/V (or Q/dO) tiles through tensor
descriptors of (B, S, H * D) views, or (S, B, H * D) for sequence-major ones: the tensor memory
accelerator copies them into shared memory asynchronously and fills rows past the sequence end with
zeros, so no per-thread addresses or masks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._interpreter import cast_rne as _cast
from ._interpreter import interpreting
from ._layout import empty_like_order, empty_siblings, sequence_major

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x · log2 e)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128)
_INT32_MAX = 2**31 - 1  # largest offset the kernels' int32 position/head arithmetic reaches without wrapping
_MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis, where the kernels put batch x heads


# INTERPRET (a constexpr, True only under TRITON_INTERPRET=1) works around two bugs of triton's CPU
# interpreter: tl.dot on bf16 operands gives garbage (operands are upcast to fp32 there), and its
# fp32 -> bf16 cast truncates instead of rounding to nearest even (rounded by hand there, so CPU tests
# see the GPU's rounding error, not twice it). Compiled kernels never take either branch.
@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32; PRECISION is "tf32x3" for fp32 inputs so a GPU keeps fp32 accuracy."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# TMA (a constexpr) says how the loops load their tiles: 0 with per-thread pointer loads, or from a tensor
# descriptor (`_tma_views`) of a batch-major (1) or sequence-major (2) view.
@triton.jit
def _tma_tile(desc, batch, row, col, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """The (ROWS, HEAD_DIM) tile at sequence position `row`, columns [col, col + HEAD_DIM) of one batch
    element, copied by the tensor memory accelerator; rows past the sequence end arrive as zeros."""
    if TMA == 2:
        return desc.load([row, batch, col]).reshape(ROWS, HEAD_DIM)
    return desc.load([batch, row, col]).reshape(ROWS, HEAD_DIM)


@triton.jit
def _kv_sources(K, V, off_b, off_kvh, stride_kb, stride_kh, stride_vb, stride_vh, HEAD_DIM: tl.constexpr,
                TMA: tl.constexpr):
    """What a key loop reads one (batch, kv head)'s K and V from: base pointers, or with TMA the descriptors
    themselves, with the batch and column coordinates `_tma_tile` takes."""
    if TMA:
        k_base, v_base = K, V
    else:
        k_base = K + off_b * stride_kb + off_kvh * stride_kh
        v_base = V + off_b * stride_vb + off_kvh * stride_vh
    return k_base, v_base, off_b.to(tl.int32), off_kvh * HEAD_DIM


# ----------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, kv_b, kv_col, offs_m, offs_d, lo, hi,
               seqlen, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi). MASK blocks are the diagonal (causal) or the
    sequence tail (non-causal); every other block is fully visible and skips the mask arithmetic.
    With TMA, k_base and v_base are tensor descriptors (`_tma_tile`)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        in_seq = offs_n < seqlen
        if TMA:  # rows past the sequence end arrive as zeros, as the masked loads below give them
            kT = tl.trans(_tma_tile(k_base, kv_b, start_n, kv_col, BLOCK_N, HEAD_DIM, TMA))  # (D, BLOCK_N)
            v = _tma_tile(v_base, kv_b, start_n, kv_col, BLOCK_N, HEAD_DIM, TMA)  # (BLOCK_N, D)
        elif MASK:
            kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None])  # (D, BLOCK_N)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :])  # (BLOCK_N, D)
        s = _dot(q, kT, INTERPRET, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASK:
            if CAUSAL:  # keys past the sequence end are also past every valid query: one compare suffices
                keep = offs_m[:, None] >= offs_n[None, :]
            else:
                keep = in_seq[None, :]
            s = tl.where(keep, s, float("-inf"))
        # Each row sees key 0 in its first block, so m_new is finite and no (-inf) - (-inf) appears.
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRET), v, INTERPRET, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                seqlen, n_heads, group, qk_scale,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                TMA: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch x q head). With TMA, K and V are tensor descriptors (Hopper's
    tensor memory accelerator copies their tiles into shared memory) instead of pointers."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first: better tail balance
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = pid_bh % n_heads
    off_kvh = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    k_base, v_base, kv_b, kv_col = _kv_sources(K, V, off_b, off_kvh, stride_kb, stride_kh, stride_vb, stride_vh,
                                               HEAD_DIM, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:  # BLOCK_M % BLOCK_N == 0: blocks left of the diagonal are whole
        full_hi = start_m * BLOCK_M
        mask_hi = tl.minimum(full_hi + BLOCK_M, seqlen)
    else:
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
        mask_hi = seqlen
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, kv_b, kv_col, offs_m,
                               offs_d, 0, full_hi, seqlen, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, TMA,
                               INTERPRET, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, kv_b, kv_col, offs_m,
                               offs_d, full_hi, mask_hi, seqlen, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, TMA,
                               INTERPRET, PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
    tl.store(LSE + pid_bh.to(tl.int64) * seqlen + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                           seqlen, n_heads, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO ∘ O) in fp32, (B, H, S): the softmax-backward term shared by dK and dQ."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = pid_bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, D)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, D)
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qs, stride_dos,
                    stride_dqs, q_b, q_col, offs_n, offs_d, lo, hi, seqlen, qk_scale, MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
                    INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one kv block over the query blocks [lo, hi) of one q head; with ATOMIC_DQ,
    also add this kv block's share of dQ (dS K, unscaled) into the fp32 buffer at dq_base. With TMA,
    q_base and do_base are tensor descriptors (`_tma_tile`).

    Query rows past the sequence end load q = dO = delta = 0, which makes their dV and dS terms exactly
    zero, so only the causal diagonal needs a mask. Keys past the end load k = 0: their dQ share is 0."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = offs_m < seqlen
        if TMA:  # rows past the sequence end arrive as zeros
            q = _tma_tile(q_base, q_b, start_m, q_col, BLOCK_M, HEAD_DIM, TMA)  # (BLOCK_M, D)
            do = _tma_tile(do_base, q_b, start_m, q_col, BLOCK_M, HEAD_DIM, TMA)  # (BLOCK_M, D)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,) log2
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        sT = _dot(k, tl.trans(q), INTERPRET, PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv += _dot(_cast(pT, do.dtype, INTERPRET), do, INTERPRET, PRECISION)  # (BLOCK_N, D)
        dpT = _dot(v, tl.trans(do), INTERPRET, PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = _cast(pT * (dpT - delta[None, :]), q.dtype, INTERPRET)  # (BLOCK_N, BLOCK_M)
        dk += _dot(dsT, q, INTERPRET, PRECISION)  # (BLOCK_N, D)
        if ATOMIC_DQ:  # dQᵀ = Kᵀ dSᵀ: head_dim rows, a Hopper wgmma shape at any BLOCK_M
            dqT = _dot(tl.trans(k), dsT, INTERPRET, PRECISION)  # (D, BLOCK_M)
            tl.atomic_add(dq_base + offs_m[None, :] * stride_dqs + offs_d[:, None], dqT, mask=row_ok[None, :],
                          sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     stride_dqb, stride_dqs, stride_dqh,
                     seqlen, n_heads, n_kv_heads, group, sm_scale, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (kv block, batch x kv head). With TMA, Q and DO are tensor descriptors."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bkv = tl.program_id(1)
    off_b = (pid_bkv // n_kv_heads).to(tl.int64)
    off_kvh = pid_bkv % n_kv_heads
    q_b = off_b.to(tl.int32)
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < seqlen
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:  # BLOCK_N % BLOCK_M == 0: queries below this key block see all of it
        full_lo = start_n + BLOCK_N
    else:
        full_lo = 0
    for g in range(group):  # the q heads sharing this kv head
        off_h = off_kvh * group + g
        if TMA:
            q_base, do_base = Q, DO
        else:
            q_base = Q + off_b * stride_qb + off_h * stride_qh
            do_base = DO + off_b * stride_dob + off_h * stride_doh
        q_col = off_h * HEAD_DIM
        dq_base = DQ_ACC + off_b * stride_dqb + off_h * stride_dqh
        row_base = (off_b * n_heads + off_h) * seqlen
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, dq_base,
                                     stride_qs, stride_dos, stride_dqs, q_b, q_col, offs_n, offs_d, start_n,
                                     tl.minimum(full_lo, seqlen), seqlen, qk_scale, True, BLOCK_M, HEAD_DIM,
                                     ATOMIC_DQ, TMA, INTERPRET, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, dq_base,
                                 stride_qs, stride_dos, stride_dqs, q_b, q_col, offs_n, offs_d, full_lo, seqlen,
                                 seqlen, qk_scale, False, BLOCK_M, HEAD_DIM, ATOMIC_DQ, TMA, INTERPRET, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kvh * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             _cast(dk, DK.dtype.element_ty, INTERPRET), mask=key_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_kvh * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             _cast(dv, DV.dtype.element_ty, INTERPRET), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, kv_b, kv_col, offs_m, offs_d,
                  lo, hi, seqlen, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi); masks and TMA as in the forward."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        in_seq = offs_n < seqlen
        if TMA:  # rows past the sequence end arrive as zeros
            kT = tl.trans(_tma_tile(k_base, kv_b, start_n, kv_col, BLOCK_N, HEAD_DIM, TMA))  # (D, BLOCK_N)
            vT = tl.trans(_tma_tile(v_base, kv_b, start_n, kv_col, BLOCK_N, HEAD_DIM, TMA))  # (D, BLOCK_N)
        elif MASK:
            kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None])  # (D, BLOCK_N)
            vT = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None])  # (D, BLOCK_N)
        s = _dot(q, kT, INTERPRET, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            if CAUSAL:
                keep = offs_m[:, None] >= offs_n[None, :]
            else:
                keep = in_seq[None, :]
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, vT, INTERPRET, PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, kT.dtype, INTERPRET), tl.trans(kT), INTERPRET, PRECISION)  # (BLOCK_M, D)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_dqb, stride_dqs, stride_dqh,
                   seqlen, n_heads, group, sm_scale, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   TMA: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch x q head). With TMA, K and V are tensor descriptors."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = pid_bh % n_heads
    off_kvh = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    row_base = pid_bh.to(tl.int64) * seqlen
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    k_base, v_base, kv_b, kv_col = _kv_sources(K, V, off_b, off_kvh, stride_kb, stride_kh, stride_vb, stride_vh,
                                               HEAD_DIM, TMA)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        full_hi = start_m * BLOCK_M
        mask_hi = tl.minimum(full_hi + BLOCK_M, seqlen)
    else:
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
        mask_hi = seqlen
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, kv_b, kv_col, offs_m,
                       offs_d, 0, full_hi, seqlen, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, TMA, INTERPRET,
                       PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, kv_b, kv_col, offs_m,
                       offs_d, full_hi, mask_hi, seqlen, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, TMA, INTERPRET,
                       PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             _cast(dq, DQ.dtype.element_ty, INTERPRET), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class FlashAttentionBlocks:
    """Tile sizes and launch shape of the three kernels (forward, dK/dV, dQ)."""

    fwd_m: int
    """Queries per forward program; a multiple of fwd_n so causal blocks split cleanly at the diagonal."""
    fwd_n: int
    """Keys per forward inner-loop step."""
    fwd_warps: int
    fwd_stages: int
    bwd_kv_m: int
    """Queries per step of the dK/dV loop; divides bwd_kv_n."""
    bwd_kv_n: int
    """Keys owned by one dK/dV program (its accumulators live in registers)."""
    bwd_q_m: int
    """Queries owned by one dQ program; a multiple of bwd_q_n."""
    bwd_q_n: int
    """Keys per step of the dQ loop."""
    bwd_warps: int
    bwd_stages: int
    bwd_atomic_dq: bool = False
    """Compute dQ inside the dK/dV kernel, adding each kv block's share to an fp32 buffer with atomic adds
    (FlashAttention-2's backward): 5 matmuls per (q block, kv block) pair instead of 7, since the dQ kernel
    no longer recomputes P and dP; the price is an fp32 dQ buffer and an order of additions that varies
    from run to run (last bits). bwd_q_m and bwd_q_n are then unused."""
    fwd_tma: bool = False
    """Load the forward's K/V tiles through Hopper's tensor memory accelerator (TMA, from host tensor
    descriptors): asynchronous bulk copies into shared memory, with no address arithmetic or masks in
    registers. Needs compute capability 9.0 or later: Triton lowers it on an A100 to code that spills
    tens of KB per thread, so the tuner offers it only on Hopper and later. Views a tensor descriptor
    cannot describe (heads not contiguous, strides not 16-byte aligned) take the pointer loads (`_tma_views`)."""
    bwd_tma: bool = False
    """The same for the backward's loop loads: Q and dO in the dK/dV kernel, K and V in the dQ kernel."""


def check_blocks(blocks: FlashAttentionBlocks) -> FlashAttentionBlocks:
    """Refuse tiles the kernels' causal split cannot use (see the field docs); returns blocks."""
    rules = [(blocks.fwd_m % blocks.fwd_n, "fwd_m must be a multiple of fwd_n"),
             (blocks.bwd_kv_n % blocks.bwd_kv_m, "bwd_kv_m must divide bwd_kv_n"),
             (blocks.bwd_q_m % blocks.bwd_q_n, "bwd_q_m must be a multiple of bwd_q_n")]
    for broken, rule in rules:
        if broken:
            raise ValueError(f"flash attention tiles {blocks}: {rule}")
    return blocks


_TUNED: dict[tuple[int, torch.dtype], FlashAttentionBlocks] = {}
"""Tiles measured fastest on this GPU (flash_attention_tuning), by (head_dim, dtype)."""


def use_blocks(head_dim: int, dtype: torch.dtype, blocks: FlashAttentionBlocks | None) -> None:
    """Make `blocks` the tiles of every later call at this head_dim and dtype (None: back to the defaults)."""
    if blocks is None:
        _TUNED.pop((head_dim, dtype), None)
    else:
        _TUNED[head_dim, dtype] = check_blocks(blocks)


def flash_attention_blocks(head_dim: int, interpret: bool | None = None,
                          dtype: torch.dtype = torch.bfloat16, tuned: bool = True) -> FlashAttentionBlocks:
    """The tiles registered by use_blocks (a start-up measurement on this GPU) when `tuned`, else H100
    defaults; or 16-wide tiles under the CPU interpreter, which keep tests fast while still crossing
    block boundaries at seq 17 and 129.

    Measured on an H100 (triton 3.6, bf16, causal, B 2, S 4096, H 32, D 128): forward 0.64 ms (430
    TFLOP/s), backward 1.98 ms (350 TFLOP/s), against 0.51 / 1.52 ms for torch's SDPA flash backend
    (an H100 run of November 2026, whose timings no perf/results/ file holds).
    128 x 64 forward tiles and 128-key dK/dV tiles measured 3-10% slower at both D 64 and D 128
    (likely register pressure of the fp32 accumulators, and coarser causal load balance), so one set
    serves every head_dim for now; head_dim stays an argument for per-size tiles later.
    fp32 tiles take twice the shared memory per pipeline stage, so fp32 runs single-staged, and its
    three-product (tf32x3) dots need three times the registers: at the bf16 tiles the compiler spilled
    0.7-95 KB per thread at D 128 (perf/kernel_resources.py, Triton 3.9, sm_80 and sm_90a); the smaller fp32
    tiles below spill at most 36 bytes there. fp32 attention is for checks, not speed.
    """
    if interpreting() if interpret is None else interpret:
        return FlashAttentionBlocks(16, 16, 4, 1, 16, 16, 16, 16, 4, 1)
    if tuned and (head_dim, dtype) in _TUNED:
        return _TUNED[head_dim, dtype]
    if dtype == torch.float32:
        return FlashAttentionBlocks(32, 32, 4, 1, 16, 32, 32, 16, 8, 1)
    return FlashAttentionBlocks(64, 64, 4, 3, 32, 64, 64, 32, 4, 4)


def _kernel_flags(dtype: torch.dtype) -> dict:
    # fp32 inputs: three tf32 products recover fp32 accuracy on tensor cores; "ieee" (FMA) dots compile
    # and run far slower. Low-precision operands ignore the setting.
    return {"INTERPRET": interpreting(), "PRECISION": "tf32x3" if dtype == torch.float32 else "tf32"}


def _offsets_fit_int32(t: torch.Tensor) -> bool:
    """Whether every element offset inside one batch element, of t and of the outputs allocated in t's
    order (empty_like_order: dense, batch- or sequence-major), is below 2^31."""
    batch, seq, heads, head_dim = t.shape
    span = sum((n - 1) * stride for n, stride in zip(t.shape[1:], t.stride()[1:]) if n > 0)  # t's own
    dense_span = ((seq - 1) * batch + 1) * heads * head_dim - 1 if sequence_major(t) else seq * heads * head_dim - 1
    return max(span, dense_span) <= _INT32_MAX


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """Keep (B, S, H, D) views as they are unless head_dim itself is strided, or an element of one batch
    element lies 2^31 or more elements from its start. The kernels offset by the batch index in int64 but
    by position and head in int32, which keeps the address arithmetic of every tile load 32-bit; such a
    view (e.g. a sequence-major tensor of 2^31 elements or more, whose positions are B·H·D apart) would be
    read, and its outputs written, at wrapped addresses. A copy is batch-major, spanning S·H·D - 1 per
    batch element, which check_inputs keeps below 2^31. Rare: a copy only for tensors of that size."""
    return t if t.stride(-1) == 1 and _offsets_fit_int32(t) else t.contiguous()


def _batch_chunks(batch: int, heads: int, *tensors: torch.Tensor):
    """Yield (batch elements, the tensors' views of them) in chunks whose batch x heads programs fit a grid's
    second axis: CUDA refuses a launch with more than 65535 there, e.g. batch 4096 with 16 heads. One chunk,
    the tensors themselves, unless batch x heads exceeds that; all tensors are batch first."""
    step = max(1, _MAX_GRID_Y // max(heads, 1))
    if batch <= step:
        yield batch, tensors
        return
    for start in range(0, batch, step):
        yield min(step, batch - start), tuple(t[start:start + step] for t in tensors)


def _bsh(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def tma_available(device: torch.device | str) -> bool:
    """Whether tiles with fwd_tma / bwd_tma can run on device: a GPU of compute capability 9.0 (Hopper) or
    later, or Triton's CPU interpreter, which emulates tensor descriptors (so the tests cover those tiles)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return interpreting()


def _tma_views(block_rows: int, *tensors: torch.Tensor) -> tuple[tuple | None, int]:
    """(B, S, H, D) tensors as tensor descriptors of their (·, ·, H * D) rows, and the kernels' TMA mode:
    batch-major views (B, S, H * D) give 1, sequence-major ones (S, B, H * D) give 2, so the descriptor's
    dimensions always run from the largest stride to the smallest, as the accelerator's tensor maps are
    laid out. (None, 0) when one of them cannot be described: heads not contiguous, a base or stride not
    16-byte aligned, strides that overlap, or tensors of different memory orders."""
    views, modes = [], set()
    for t in tensors:
        batch, seqlen, heads, head_dim = t.shape
        stride_b, stride_s, stride_h, stride_d = t.stride()
        row = heads * head_dim
        item = t.element_size()
        if (stride_d != 1 or (heads > 1 and stride_h != head_dim) or t.data_ptr() % 16
                or (stride_b * item) % 16 or (stride_s * item) % 16):
            return None, 0
        if stride_s >= row and stride_b >= seqlen * stride_s:
            modes.add(1)
            views.append(TensorDescriptor(t, [batch, seqlen, row], [stride_b, stride_s, 1], [1, block_rows, head_dim]))
        elif stride_b >= row and stride_s >= batch * stride_b:
            modes.add(2)
            views.append(TensorDescriptor(t, [seqlen, batch, row], [stride_s, stride_b, 1], [block_rows, 1, head_dim]))
        else:
            return None, 0
    return (tuple(views), modes.pop()) if len(modes) == 1 else (None, 0)


def _launcher(kernel, grid: tuple, compile_only: bool):
    """kernel[grid], or with compile_only a call that compiles the kernel for its arguments and launches
    nothing (Triton's warmup; inside its AsyncCompileMode the compile goes to a worker thread)."""
    return functools.partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]


def flash_attention_fwd(q, k, v, causal: bool, softmax_scale: float, blocks: FlashAttentionBlocks | None = None,
                        compile_only: bool = False):
    """Launch the forward; returns o (B, S, H, D) in q's dtype and lse (B, H, S) fp32 (natural log of
    the row sums of exp(scale · q·k) over the visible keys). Inputs must already be validated.
    compile_only compiles the kernels these arguments need and launches none (o and lse are then garbage)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, seqlen, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    blocks = blocks or flash_attention_blocks(head_dim, dtype=q.dtype)
    o = empty_like_order(q)  # (B, S, H, D), in q's batch/sequence memory order
    lse = torch.empty((batch, n_heads, seqlen), dtype=torch.float32, device=q.device)  # (B, H, S)
    for n_batch, (q_, k_, v_, o_, lse_) in _batch_chunks(batch, n_heads, q, k, v, o, lse):
        kv, tma = _tma_views(blocks.fwd_n, k_, v_) if blocks.fwd_tma else (None, 0)
        _launcher(_fwd_kernel, (triton.cdiv(seqlen, blocks.fwd_m), n_batch * n_heads), compile_only)(
            q_, *(kv or (k_, v_)), o_, lse_, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(o),
            seqlen, n_heads, group, softmax_scale * _LOG2E,
            CAUSAL=causal, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, HEAD_DIM=head_dim, TMA=tma,
            num_warps=blocks.fwd_warps, num_stages=blocks.fwd_stages, **_kernel_flags(q.dtype),
        )
    return o, lse


def _rows_of_heads(t: torch.Tensor) -> torch.Tensor | None:
    """(B, S, H, D) as the (B, S, H·D) view it is when its heads lie back to back, else None."""
    if t.stride(3) == 1 and (t.shape[2] == 1 or t.stride(2) == t.shape[3]):
        return t.flatten(2)
    return None


def _grad_buffers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """dq, dk, dv, uninitialised: where q, k, v are the head slices of one (B, S, ·) tensor (a fused q/k/v
    projection's output), slices of one new tensor in the same places (empty_siblings), which the
    projection's backward takes as its gradient without a concatenating copy; else each in its input's
    batch/sequence memory order."""
    rows = [_rows_of_heads(t) for t in (q, k, v)]
    if any(r is None for r in rows):
        return [empty_like_order(t) for t in (q, k, v)]
    return [g.unflatten(2, t.shape[2:]) for g, t in zip(empty_siblings(rows), (q, k, v))]


def flash_attention_bwd(do, q, k, v, o, lse, causal: bool, softmax_scale: float,
                        blocks: FlashAttentionBlocks | None = None, compile_only: bool = False):
    """Launch the backward; returns dq (B, S, H, D), dk and dv (B, S, H_kv, D) in the inputs' dtype.
    compile_only as in flash_attention_fwd."""
    do, q, k, v = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v)
    batch, seqlen, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_heads // n_kv_heads
    blocks = blocks or flash_attention_blocks(head_dim, dtype=q.dtype)
    if blocks.bwd_atomic_dq and torch.are_deterministic_algorithms_enabled():
        blocks = dataclasses.replace(blocks, bwd_atomic_dq=False)  # the same tiles, with the dQ kernel
    flags = _kernel_flags(q.dtype)
    qk_scale = softmax_scale * _LOG2E

    delta = torch.empty_like(lse)  # (B, H, S) fp32
    pre_m = 64 if not interpreting() else 16
    for n_batch, (o_, do_, delta_) in _batch_chunks(batch, n_heads, o, do, delta):
        _launcher(_bwd_preprocess_kernel, (triton.cdiv(seqlen, pre_m), n_batch * n_heads), compile_only)(
            o_, do_, delta_, *_bsh(o), *_bsh(do), seqlen, n_heads, BLOCK_M=pre_m, HEAD_DIM=head_dim,
        )
    dq, dk, dv = _grad_buffers(q, k, v)  # (B, S, H, D), (B, S, H_kv, D) x 2
    # fp32 dQ sums for the atomic variant (zeroed: every share is added); otherwise an unused placeholder.
    dq_acc = empty_like_order(q, dtype=torch.float32).zero_() if blocks.bwd_atomic_dq else dq
    for n_batch, (q_, k_, v_, do_, *rest) in _batch_chunks(batch, n_heads, q, k, v, do, lse, delta, dk, dv, dq_acc):
        q_do, tma = _tma_views(blocks.bwd_kv_m, q_, do_) if blocks.bwd_tma else (None, 0)
        q_, do_ = q_do or (q_, do_)
        _launcher(_bwd_dkdv_kernel, (triton.cdiv(seqlen, blocks.bwd_kv_n), n_batch * n_kv_heads), compile_only)(
            q_, k_, v_, do_, *rest, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(do), *_bsh(dk), *_bsh(dv), *_bsh(dq_acc),
            seqlen, n_heads, n_kv_heads, group, softmax_scale, qk_scale,
            CAUSAL=causal, BLOCK_M=blocks.bwd_kv_m, BLOCK_N=blocks.bwd_kv_n, HEAD_DIM=head_dim,
            ATOMIC_DQ=blocks.bwd_atomic_dq, TMA=tma, num_warps=blocks.bwd_warps,
            num_stages=blocks.bwd_stages, **flags,
        )
    if blocks.bwd_atomic_dq:
        dq.copy_(dq_acc.mul_(softmax_scale))  # the dQ kernel's rounding: scale in fp32, then one cast
        return dq, dk, dv
    for n_batch, (q_, k_, v_, *rest) in _batch_chunks(batch, n_heads, q, k, v, do, lse, delta, dq):
        kv, tma = _tma_views(blocks.bwd_q_n, k_, v_) if blocks.bwd_tma else (None, 0)
        _launcher(_bwd_dq_kernel, (triton.cdiv(seqlen, blocks.bwd_q_m), n_batch * n_heads), compile_only)(
            q_, *(kv or (k_, v_)), *rest, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(do), *_bsh(dq),
            seqlen, n_heads, group, softmax_scale, qk_scale,
            CAUSAL=causal, BLOCK_M=blocks.bwd_q_m, BLOCK_N=blocks.bwd_q_n, HEAD_DIM=head_dim, TMA=tma,
            num_warps=blocks.bwd_warps, num_stages=blocks.bwd_stages, **flags,
        )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------- autograd
class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float):
        o, lse = flash_attention_fwd(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError for what the kernels cannot take (shapes, dtypes, head_dim); meta tensors are enough."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "flash_attention: q, k and v must be 4-D (batch, seq, heads, head_dim); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            "flash_attention: q, k and v must share one dtype among float16, bfloat16 and float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"flash_attention: q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    for axis, name in ((0, "batch"), (1, "seq"), (3, "head_dim")):
        if k.shape[axis] != q.shape[axis]:
            raise ValueError(f"flash_attention: q has {name} {q.shape[axis]} but k and v have {name} {k.shape[axis]}")
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"flash_attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {head_dim} is not supported; use one of {_HEAD_DIMS}")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"flash_attention: batch and seq must be at least 1; got shape {tuple(q.shape)}")
    if q.shape[1] * heads * head_dim > _INT32_MAX + 1:  # even a batch-major copy: see _unit_last
        raise ValueError(f"flash_attention: one batch element of q holds seq * heads * head_dim = "
                         f"{q.shape[1] * heads * head_dim} elements; the kernels support at most 2^31")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ (+ causal mask)) v with grouped-query heads, differentiable in q, k and v.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim) with kv_heads dividing
    heads (q head h reads kv head h // (heads // kv_heads)). head_dim in 16, 32, 64, 128.
    softmax_scale defaults to 1 / sqrt(head_dim). Returns (batch, seq, heads, head_dim) in q's dtype.
    """
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _FlashAttention.apply(q, k, v, bool(causal), scale)


# ------------------------------------------------------------------------------------------ reference
def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """Plain-torch attention: K/V heads repeated to the q heads, scores and softmax in fp32, P cast to
    q's dtype before P·V. Materializes (B, H, S, S); for tests and benchmarks only."""
    batch, seqlen, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    k = k.repeat_interleave(group, dim=2)  # (B, S, H, D)
    v = v.repeat_interleave(group, dim=2)  # (B, S, H, D)
    scores = torch.einsum("bshd,bthd->bhst", q, k).float() * scale  # (B, H, S, S)
    if causal:
        above = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)  # (S, S)
        scores = scores.masked_fill(above, float("-inf"))
    p = scores.softmax(dim=-1).to(q.dtype)  # (B, H, S, S)
    return torch.einsum("bhst,bthd->bshd", p, v).to(q.dtype)  # (B, S, H, D)
