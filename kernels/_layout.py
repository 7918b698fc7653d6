"""Outputs allocated in their input's memory order, so a transposed (batch, seq, ...) view stays a view.

The model hands the attention kernels (B, S, H, D) tensors. Under sequence parallelism these are views
of sequence-first (S, B, H, D) memory (megamath keeps its residual stream sequence first there, as
Megatron-LM does). An output allocated contiguous (B, S, H, D) would have to be copied back to sequence
order by the model, once per kernel and layer; allocated in the input's order, the model's transposes
cost nothing. Batch-first inputs get plain contiguous outputs, as before.
"""
from __future__ import annotations

import torch


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
