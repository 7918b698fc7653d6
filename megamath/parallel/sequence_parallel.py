"""Sequence parallelism's gradient bookkeeping: the weights applied to sequence chunks get partial gradients.

Which weights those are is a property of their names (for Llama, megamath.model.partition); this module
only sums their gradients over the tensor-parallel group, wherever the optimizer keeps them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megamath.parallel.mappings import all_reduce_


@torch.no_grad()
def allreduce_sequence_parallel_grads(params: list[nn.Parameter], state, optimizer=None) -> None:
    """Sum over TP the gradients of `params`, the sequence-parallel weights (`model.sequence_parallel_parameters()`).

    Under sequence parallelism each rank runs the norms on its own sequence chunk, so its norm-weight
    gradient covers only those positions. Call this once per step, after the last micro-batch's backward
    (the sum is linear, so once is enough).

    Where the gradients are: in `p.grad` (optimizer None, e.g. torch.optim), summed here in one flat
    message, a single all-reduce however many norms the model has; or, with the ZeRO-1 optimizer, in its
    flat gradient buffer, whose DP reduce-scatter may already be in flight (overlap_grad_reduce): the sum
    is then left to the optimizer's step (`sum_sequence_parallel_grads`), on its DP pieces after the DP
    reduction. A no-op at tp_size 1 and for an empty list.
    """
    if state.tp_size == 1:
        return
    if optimizer is not None:  # summed inside its step, after the DP reduction (see ZeroOptimizer)
        optimizer.sum_sequence_parallel_grads(params)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    all_reduce_(flat, state.tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
