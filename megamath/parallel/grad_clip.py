"""The global gradient norm when gradients are spread over ZeRO-1 shards and tensor-parallel splits.

Each rank holds a slice of every gradient twice over: ZeRO-1 gives it 1/dp of the flat gradient buffer,
and tensor parallelism gives it 1/tp of every split weight. The global norm is

    ||g||² = Σ_dp Σ_tp ||g_split||²  +  Σ_dp ||g_replicated||²

Split weights (named in ZeroOptimizer's `split_names`: column- or row-parallel matrices, the vocabulary-parallel
embedding) hold different pieces on the TP ranks, so their squares are summed over TP as well as DP.
Replicated weights (all others: the RMSNorm weights, KV projections that TP cannot split) are the same on every TP rank,
so they are counted once, from the DP sum alone. The TP all-reduce also carries `replicated · 0`: 0 when
finite, NaN otherwise, so a non-finite gradient on one TP rank makes every TP rank skip the step (their
weights would drift apart otherwise).
"""
from __future__ import annotations

import torch

from megamath.parallel.mappings import all_reduce_


def global_grad_norm(sumsq_split: torch.Tensor, sumsq_replicated: torch.Tensor, *, dp_group=None,
                     tp_group=None) -> torch.Tensor:
    """sqrt of (split squares summed over DP and TP) + (replicated squares summed over DP only).

    sumsq_split, sumsq_replicated: fp32 scalars, this rank's sums of squares over its shard. A group of
    None means that dimension has size 1 (no collective). Returns an fp32 scalar on the inputs' device;
    a NaN or inf on any rank makes the result non-finite on every rank.
    """
    sums = torch.stack([sumsq_split.float(), sumsq_replicated.float()])  # (2,)
    all_reduce_(sums, dp_group)
    split, replicated = sums[0], sums[1]
    if tp_group is not None:
        over_tp = torch.stack([split, replicated * 0.0])  # (2,): Σ_tp split, and 0 unless some rank is non-finite
        all_reduce_(over_tp, tp_group)
        split = over_tp[0] + over_tp[1]
    return (split + replicated).sqrt()


def clip_coefficient(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (grad_norm + 1e-6)) on grad_norm's device, in its dtype: torch.nn.utils.clip_grad_norm_'s
    rule and arithmetic. 1 when max_norm is 0 (off). A non-finite norm gives a non-finite or meaningless
    factor: the caller skips the step instead (ZeroOptimizer does, on the device)."""
    if max_norm <= 0.0:
        return torch.ones_like(grad_norm)
    return torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
