"""Outputs allocated in their inputs' memory layout, so the model's views stay views.

The model hands the attention kernels (B, S, H, D) tensors. Under sequence parallelism these are views
of sequence-first (S, B, H, D) memory (megamath keeps its residual stream sequence first there, as
Megatron-LM does). An output allocated contiguous (B, S, H, D) would have to be copied back to sequence
order by the model, once per kernel and layer; allocated in the input's order, the model's transposes
cost nothing. Batch-first inputs get plain contiguous outputs, as before.

Likewise a fused projection's output (..., Σ n) reaches a kernel as last-dim slices (gate and up for SwiGLU;
q, k and v for attention): the kernel's gradients, allocated as slices of one new tensor in the same places
(empty_siblings), are the projection's output gradient as they stand
(megamath.parallel.fused_linear.join_last_dim), with no copy.

Row kernels (RMSNorm, the embedding's gradient) read any leading shape as (rows, N) rows of unit stride
(`rows_2d`).
"""
from __future__ import annotations

import math

import torch


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """View as (rows, N) with unit column stride, copying only when the layout forbids a view."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: ambiguous when the width is 0


def sequence_major(t: torch.Tensor) -> bool:
    """True when t's first two dims (batch, seq) are laid out seq-major: t is the transpose of an (S, B, ...)."""
    return t.dim() >= 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride(1) > t.stride(0)


def empty_like_order(like: torch.Tensor, shape: tuple | torch.Size | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (B, S, ...) tensor of `shape` (default like's) in like's batch/seq memory order."""
    shape = tuple(like.shape if shape is None else shape)
    dtype = like.dtype if dtype is None else dtype
    if sequence_major(like):
        return torch.empty((shape[1], shape[0]) + shape[2:], dtype=dtype, device=like.device).transpose(0, 1)
    return torch.empty(shape, dtype=dtype, device=like.device)


def last_dim_parent(parts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The one dense tensor (..., Σ n_i) whose last-dim slices `parts` (..., n_i) are, in this order, else None.

    Why: a fused projection's output y (..., Σ n_i) is handed on as slices (q, k, v; gate, up). When a
    kernel allocates its gradients as slices of one new tensor in the same places (empty_siblings), the
    split's backward can hand that tensor on as y's gradient instead of concatenating a copy of it.
    Dense means y's memory holds nothing else: any order of the leading dims (batch or sequence first).
    """
    if len(parts) < 2 or any(t is None for t in parts):
        return None
    first = parts[0]
    lead, strides = first.shape[:-1], first.stride()
    if first.dim() == 0 or strides[-1] != 1:
        return None
    offset = first.storage_offset()
    for t in parts:
        if (t.dtype != first.dtype or t.device != first.device or t.shape[:-1] != lead or t.stride() != strides
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.shape[-1]
    width = offset - first.storage_offset()
    expected = width
    for stride, size in sorted((st, s) for s, st in zip(lead, strides[:-1]) if s > 1):
        if stride != expected:
            return None
        expected *= size
    return first.as_strided(tuple(lead) + (width,), strides, first.storage_offset())


def empty_siblings(likes: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like `likes`: slices of one new tensor in the same places when the likes,
    taken in memory order, are the slices of one (last_dim_parent), else each in its like's batch/sequence
    order (empty_like_order)."""
    order = sorted(range(len(likes)), key=lambda i: likes[i].storage_offset())
    parent = last_dim_parent([likes[i] for i in order])
    if parent is None:
        return [empty_like_order(like) for like in likes]
    fresh = torch.empty_strided(parent.shape, parent.stride(), dtype=parent.dtype, device=parent.device)
    out: list[torch.Tensor] = [None] * len(likes)  # type: ignore[list-item]
    for i, part in zip(order, fresh.split([likes[i].shape[-1] for i in order], dim=-1)):
        out[i] = part
    return out
