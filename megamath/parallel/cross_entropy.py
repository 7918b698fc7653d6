"""The vocabulary-parallel cross-entropy in plain torch: the reference beside kernels.cross_entropy's `group=` path.

The Triton kernel package imports nothing of megamath, so the tensor-parallel reference, which needs
this package's differentiable collectives, lives here.
"""
from __future__ import annotations

import torch

from megamath.parallel.mappings import all_reduce_max_, group_rank, group_size, reduce_from_tp


def vocab_parallel_cross_entropy_ref(logits_local: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                                     group=None, check_targets: bool = True, vocab_start: int | None = None,
                                     vocab_size: int | None = None) -> torch.Tensor:
    """Plain-torch mean cross-entropy over logits whose vocabulary is split over `group` (Megatron's
    vocab-parallel cross-entropy; the reference beside kernels.cross_entropy's `group=` path).

    logits_local (N, V/p): columns [r·V/p, (r+1)·V/p) of the full logits; targets (N,) full-vocabulary ids.
    Given `vocab_start` and `vocab_size` (a vocabulary p does not divide, megamath.model.partition.vocab_range):
    columns [vocab_start, vocab_start + width) of vocab_size; the widths then differ between ranks.
    Per row: loss = log Σ_v exp(x_v - M) + M - x_t with M the global max. The sums over the vocabulary
    go through reduce_from_tp (identity backward), so each rank's gradient is its own columns of
    softmax - onehot; M is a constant shift and carries no gradient. Every rank returns the same loss.

    A target outside the vocabulary (not ignore_index) raises when `check_targets`, which reads the device
    (a sync on a GPU); the training step passes False, as with the kernel, and such a row's loss is then NaN.
    """
    p, rank = group_size(group), group_rank(group)
    n_rows, v_local = logits_local.shape
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError("cross_entropy: vocab_start and vocab_size go together")
    if vocab_start is None:  # an even split
        vocab_start, vocab_size = rank * v_local, v_local * p
    valid = targets != ignore_index  # (N,)
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    if check_targets and bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"cross_entropy: target {int(targets[first])} at row {first} is outside the vocabulary "
                         f"[0, {vocab_size}) and is not ignore_index ({ignore_index})")
    x = logits_local.float()  # (N, V/p)
    row_max = x.detach().amax(dim=1)  # (N,)
    all_reduce_max_(row_max, group)
    sum_exp = reduce_from_tp(torch.exp(x - row_max[:, None]).sum(dim=1), group)  # (N,)
    local_t = targets - vocab_start  # (N,)
    owned = valid & (local_t >= 0) & (local_t < v_local)
    target_logit = x.gather(1, local_t.clamp(0, v_local - 1)[:, None]).squeeze(1)  # (N,)
    target_logit = reduce_from_tp(torch.where(owned, target_logit, 0.0), group)  # (N,)
    per_row = torch.log(sum_exp) + row_max - target_logit  # (N,)
    per_row = torch.where(bad, torch.nan, per_row)  # unchecked: a bad id is never a finite loss
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)
