"""Matrices back to back in memory: the order they tile one block in, and the one matrix they form.

Why a file of its own: ZeRO-1's flat buffers lay a layer's projection weights (and, alike, their gradients'
slots) back to back, and two users read that layout: the fused projections (fused_linear.py, layers.py) and
the weight gradients written into the buffer (grad_into_buffer.py). Both import it from here.
"""
from __future__ import annotations

from typing import Sequence

import torch


def adjacent_order(weights: Sequence[torch.Tensor]) -> list[int] | None:
    """The indices of `weights` in memory order when they tile one contiguous row-major block (same dtype,
    device and in-features), else None."""
    if len(weights) < 2:
        return None
    first = weights[0]
    if any(w.dim() != 2 or not w.is_contiguous() or w.dtype != first.dtype or w.device != first.device
           or w.shape[1] != first.shape[1] for w in weights):
        return None
    if any(w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for w in weights):
        return None
    order = sorted(range(len(weights)), key=lambda i: weights[i].data_ptr())
    for a, b in zip(order, order[1:]):
        if weights[a].data_ptr() + weights[a].numel() * weights[a].element_size() != weights[b].data_ptr():
            return None
    return order


def fused_view(ordered: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (Σ out, in) matrix that row-major matrices back to back in memory (in this order) form: a view, no
    copy (of weights, or of their gradients' slots in the buffer, which lie alike)."""
    first = ordered[0]
    return first.as_strided((sum(w.shape[0] for w in ordered), first.shape[1]), (first.shape[1], 1))
