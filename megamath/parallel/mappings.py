"""Tensor parallelism's communications as a small vocabulary of differentiable functions.

Each function is one collective in the forward and its adjoint in the backward (Megatron-LM core's
mappings). Layers call them by name, so a reader of a layer sees every collective it does. Every
function takes its process group explicitly; with group None (or a group of one rank) it is the identity
and adds no autograd node, so the serial model runs exactly the plain ops.

p = size of the TP group, r = this rank in it. Activations are batch first, (B, S, h), except under
sequence parallelism, where the model keeps its residual stream sequence first, (S, B, h) (Megatron-LM's
layout), and SP splits that leading S into p contiguous chunks: rank r holds positions [r·S/p, (r+1)·S/p),
and S must be divisible by p. Why sequence first: a chunk of dim 0 is one contiguous block whatever B
is, so the all-gather's rank-major output already is the gathered (S, B, h) and the reduce-scatter reads
its input in place; batch first with B > 1, both would copy the whole (B, S, h) to and from rank-major
order at every call (a layer's four forward collectives and six backward ones).

    function                      forward                                 backward
    copy_to_tp                    identity        (B, S, h)               all-reduce      (B, S, h)
    reduce_from_tp                all-reduce      (B, S, h)               identity        (B, S, h)
    scatter_to_sequence           split dim 0     (S, B, h) -> (S/p, B, h)    all-gather  (S/p, B, h) -> (S, B, h)
    gather_from_sequence          all-gather      (S/p, B, h) -> (S, B, h)    reduce-scatter (S, B, h) -> (S/p, B, h)
    reduce_scatter_to_sequence    reduce-scatter  (S, B, h) -> (S/p, B, h)    all-gather  (S/p, B, h) -> (S, B, h)
    gather_from_tp                all-gather last (..., n/p) -> (..., n)      split last  (..., n) -> (..., n/p)

Why these pairs: when every rank reads the same input (copy_to_tp, gather_from_sequence), each rank's
backward only holds its own share of that input's gradient, so the backward sums over ranks; when each
rank produces a partial sum (reduce_from_tp, reduce_scatter_to_sequence), the forward sums and the
gradient of a sum is handed unchanged to every term. gather_from_sequence's backward is a reduce-scatter
because what follows it (a column-parallel layer) leaves a partial gradient on each rank; gather_from_tp's
backward is a plain split because what follows it is replicated (the same on every rank).

Collectives: on NCCL the native all_gather_into_tensor / reduce_scatter_tensor run on a rank-major
buffer; other backends (gloo on CPU: its reduce-scatter is missing from older torch) all-gather into a
list and reduce-scatter as all-reduce + slice, which moves p times the bytes but needs no special support.
The environment variable MEGAMATH_COLLECTIVES overrides the choice: `native` everywhere (gloo of a recent
torch supports it: the tests run NCCL's code path on CPU this way) or `portable` everywhere.

Every collective of megamath goes through this file: the differentiable pairs below, and the plain ones
(all_reduce_, all_reduce_max_, broadcast_, all_gather_list, all_gather_objects, all_gather_into,
reduce_scatter_into, barrier) for optimizers, gradient norms, checkpoints and the training loop.
The differentiable ones write into new tensors (the plain ones named with a trailing _ work in place): a
gradient handed to a backward may be shared with another branch of the graph (an add passes the same
tensor to both inputs), so it is never reduced in place.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

SEQUENCE_DIM = 0
"""The dimension sequence parallelism splits: S of the sequence-first (S, B, h) activations."""
NATIVE_BACKENDS = ("nccl",)
"""Backends whose reduce-scatter / all-gather into one tensor are used directly (unless overridden)."""
COLLECTIVES_ENV = "MEGAMATH_COLLECTIVES"
# torch >= 2.13 renamed the single-tensor collectives; the old names warn there but are all torch 2.11 has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Native all-gather into one rank-major tensor (NCCL; see `native_collectives`); async_op returns the work."""
    return _all_gather_single(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Native reduce-scatter of a rank-major tensor: chunk r of x's dim 0, summed, lands in rank r's out."""
    return _reduce_scatter_single(out, x, group=group, async_op=async_op)


# ---- plain collectives (not differentiable) ---------------------------------------------------------------

def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def native_collectives(group) -> bool:
    """Whether to use single-tensor all-gather / reduce-scatter on this group (see MEGAMATH_COLLECTIVES)."""
    choice = os.environ.get(COLLECTIVES_ENV, "auto")
    if choice not in ("auto", "native", "portable"):
        raise ValueError(f"{COLLECTIVES_ENV} must be auto, native or portable, got {choice!r}")
    if choice != "auto":
        return choice == "native"
    return dist.get_backend(group) in NATIVE_BACKENDS


def all_reduce_(x: torch.Tensor, group, async_op: bool = False):
    """Sum over the group, in place (a no-op for group None); async_op returns the work to wait on."""
    if group is not None:
        return dist.all_reduce(x, group=group, async_op=async_op)
    return None


def all_reduce_max_(x: torch.Tensor, group) -> None:
    """Element-wise max over the group, in place (a no-op for group None)."""
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)


def broadcast_(x: torch.Tensor, src: int, group) -> None:
    """Global rank src's x into every rank's x, in place (a no-op for group None)."""
    if group is not None:
        dist.broadcast(x, src=src, group=group)


def all_gather_list(x: torch.Tensor, group, async_op: bool = False, out: list[torch.Tensor] | None = None):
    """Every rank's x in rank order, as a list (gloo's form of all-gather); [x] for group None.

    With async_op the list is returned with the work to wait on: (list, work)."""
    if group is None:
        return ([x], None) if async_op else [x]
    out = out if out is not None else [torch.empty_like(x) for _ in range(group_size(group))]
    work = dist.all_gather(out, x, group=group, async_op=async_op)
    return (out, work) if async_op else out


def all_gather_objects(obj, group) -> list:
    """Every rank's picklable obj in rank order; [obj] for group None."""
    if group is None:
        return [obj]
    out = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group) -> None:
    """Wait for every rank of the group (a no-op for group None: pass ParallelState.world_group)."""
    if group is not None:
        dist.barrier(group=group)


def _check_divisible(x: torch.Tensor, dim: int, p: int) -> int:
    n = x.shape[dim]
    if n % p:
        what = "sequence length" if dim == SEQUENCE_DIM and x.dim() == 3 else f"dim {dim} of size"
        raise ValueError(f"{what} {n} of a tensor of shape {tuple(x.shape)} is not divisible by the "
                         f"tensor-parallel size {p}")
    return n // p


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group into a new tensor."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along dim, in rank order: (.., n, ..) -> (.., p·n, ..)."""
    p = group_size(group)
    x = x.contiguous()
    if native_collectives(group):
        out = x.new_empty((p * x.shape[0],) + tuple(x.shape[1:]))  # rank-major: the ranks' x one after another
        all_gather_into(out, x, group)
        return out.view((p,) + tuple(x.shape)).movedim(0, dim).flatten(dim, dim + 1)  # a copy unless dim is 0
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, keep this rank's chunk r of dim: (.., n, ..) -> (.., n/p, ..)."""
    p = group_size(group)
    n_local = _check_divisible(x, dim, p)
    if native_collectives(group):
        x_rank_major = x.unflatten(dim, (p, n_local)).movedim(dim, 0).contiguous()  # (p, .., n/p, ..)
        out = x.new_empty(x_rank_major.shape[1:])  # (.., n/p, ..)
        reduce_scatter_into(out, x_rank_major.flatten(0, 1), group)  # chunk r of dim 0 goes to rank r
        return out
    return _own_chunk(all_reduce(x, group), dim, group_rank(group) * n_local, n_local)


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk r of dim, no communication: (.., n, ..) -> (.., n/p, ..)."""
    n_local = _check_divisible(x, dim, group_size(group))
    return _own_chunk(x, dim, group_rank(group) * n_local, n_local)


def _own_chunk(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """x.narrow(dim, start, length) in a tensor of its own. Not a view: a chunk of dim 0 is contiguous, and a
    view kept for the backward would hold all of x's memory alive (p times the chunk)."""
    return x.narrow(dim, start, length).clone(memory_format=torch.contiguous_format)


# ---- the paired autograd functions --------------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, SEQUENCE_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, SEQUENCE_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, SEQUENCE_DIM, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, grad.dim() - 1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward: x (B, S, h) enters a region where every rank reads all of it."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: per-rank partial sums (B, S, h) leave the TP region."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's sequence chunk (S, B, h) -> (S/p, B, h); all-gather backward."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the sequence chunks (S/p, B, h) -> (S, B, h); reduce-scatter backward (the consumer's
    gradient is a per-rank partial sum)."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Sum per-rank partials and keep this rank's sequence chunk (S, B, h) -> (S/p, B, h); all-gather backward."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim (..., n/p) -> (..., n), e.g. vocabulary-parallel logits; the backward
    keeps this rank's slice of the gradient, which must be the same on every rank."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)
