"""Tensor-parallel layers: the linear maps and the embedding split over the ranks of a TP group.

torch stores a Linear's weight as (out, in), i.e. W = Aᵀ for Y = XA. With p ranks, rank r:

    ColumnParallelLinear    Y = XA,  A = [A_1 … A_p] split by output columns (W rows, dim 0);
                            Y_r = X A_r stays split: (B, S, out/p).
                            input: copy_to_tp (B, S, in), or under SP gather_from_sequence (S/p, B, in) -> (S, B, in)
    RowParallelLinear       Y = XA,  A = [A_1; …; A_p] split by input rows (W columns, dim 1), X = [X_1 … X_p];
                            Y = Σ_r X_r A_r: each rank's (B, S, out) is a partial sum.
                            output: reduce_from_tp (B, S, out), or under SP reduce_scatter_to_sequence (S/p, B, out)
    VocabParallelEmbedding  E = [E_1; …; E_p] split by vocabulary rows; rank r looks up the ids it owns,
                            zeros the others, and the sum over ranks (reduce_from_tp, or reduce-scatter
                            under SP) is the serial lookup.
    VocabParallelLMHead     the column-parallel LM head over the vocabulary: logits (B, S, stop - start).

The vocabulary need not be divisible by p (a pretrained model's 32,001 at TP 2): rank r of the two vocabulary
layers holds ceil(V/p) rows, the serial rows vocab_split.vocab_range(V, p, r) first, then zero
padding rows (on the last rank(s) only). Padding is never read: the embedding treats its ids as foreign, the
LM head multiplies a view of its valid rows only, so no padded logit exists, the padding's gradient is zero
and (with zero Adam moments) it stays zero through every step. `shard_tensor(..., padded=True)` writes the
padding, `merge_shards(..., size=V)` checks it is zero and strips it; `gather_vocab_logits` joins the
ranks' unequal logit slices into the (..., V) serial logits.
    TPReplicatedLinear      every rank holds the full weight (KV heads that do not split evenly); its
                            gradient is summed over the group in the backward so all copies stay equal.

Shapes are written batch first; under SP the activations are sequence first, (S, B, ·), and sequence
chunks (S/p, B, ·) (megamath.parallel.mappings says why). The layers themselves do not care: their
matmuls act on the last dim, and the sequence collectives split dim 0.

Each layer class states the dim it cuts (`partition_dim`). Nothing is written onto the weight tensors:
which parameters of a model are split or sequence-parallel is a table by name (for Llama,
megamath.model.partition), read by the gradient norm (ZeroOptimizer's `split_names`) and by the SP
gradient sum, because attributes on a tensor vanish when the tensor is re-created (`to_empty`).
`shard_tensor` / `merge_shards` are the slicing rule, so a TP layer holds exactly the serial weight's
slice (`load_full_weight`). Layers take their group explicitly; with group None they are plain Linear /
Embedding (no communication, no autograd node added).

Several column-parallel layers that read the same input (q, k, v; gate, up) should enter the TP region
once: `column_parallel_inputs(x, layers, group, sequence_parallel)`, which costs one all-gather (SP) or one
backward all-reduce instead of one per layer. Under SP it also keeps only the rank's (S/p, B, h) chunk for
the backward, not the gathered (S, B, h) (Megatron's re-gather in the backward: p times less activation
memory for one more all-gather); a lone ColumnParallelLinear under SP (the LM head) does the same.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamath.parallel.back_to_back import adjacent_order, fused_view
from megamath.parallel.fused_linear import Epilogue, in_caller_order, join_gradients, linears, split_output
from megamath.parallel.grad_into_buffer import embedding, linear, weight_gradient_into_slots
from megamath.parallel.mappings import (
    SEQUENCE_DIM, all_gather, copy_to_tp, gather_from_sequence, gather_from_tp, group_rank, group_size, reduce_from_tp,
    reduce_scatter, reduce_scatter_to_sequence,
)
from megamath.parallel.vocab_split import vocab_range, vocab_rows_per_rank


# ---- slicing rule ----------------------------------------------------------------------------------------

def shard_tensor(full: torch.Tensor, dim: int, tp_size: int, tp_rank: int, name: str = "tensor",
                 padded: bool = False) -> torch.Tensor:
    """Rank tp_rank's contiguous chunk of `full` along dim (a new tensor, not a view into `full`).

    `padded` (the vocabulary's rows): tp_size need not divide the dim; the chunk is ceil(n/p) rows, the
    serial rows vocab_range(n, p, r) followed by zeros.
    """
    if padded:
        start, stop = vocab_range(full.shape[dim], tp_size, tp_rank)
        rows = vocab_rows_per_rank(full.shape[dim], tp_size)
        if stop - start == rows:  # no padding on this rank: what an even split gives, bit for bit
            return full.narrow(dim, start, rows).clone()
        chunk = full.new_zeros(full.shape[:dim] + (rows,) + full.shape[dim + 1:])  # padding rows stay zero
        chunk.narrow(dim, 0, stop - start).copy_(full.narrow(dim, start, stop - start))
        return chunk
    if full.shape[dim] % tp_size:
        raise ValueError(f"cannot split {name} of shape {tuple(full.shape)}: dim {dim} is not divisible by the "
                         f"tensor-parallel size {tp_size}")
    n_local = full.shape[dim] // tp_size
    return full.narrow(dim, tp_rank * n_local, n_local).clone()


def merge_shards(shards: list[torch.Tensor], dim: int, size: int | None = None, name: str = "tensor") -> torch.Tensor:
    """Inverse of shard_tensor: concatenate rank 0 … p-1's chunks along dim.

    `size` (padded shards: the true vocabulary V): each rank's rows past vocab_range are padding, which must
    be zero and is stripped. Checked rather than dropped blindly: a nonzero padding row is trained weight or
    optimizer state that the serial model has no place for (a Megatron-style padded layout, or a bug), and
    dropping it would lose it silently.
    """
    if size is None:
        return torch.cat(shards, dim=dim)
    pieces = []
    for rank, shard in enumerate(shards):
        start, stop = vocab_range(size, len(shards), rank)
        padding = shard.narrow(dim, stop - start, shard.shape[dim] - (stop - start))
        if padding.numel() and bool(padding.count_nonzero()):
            raise ValueError(f"{name}: TP rank {rank}'s vocabulary padding (rows {stop - start}..{shard.shape[dim] - 1} "
                             f"of {len(shards)} ranks' split of {size}) is not zero")
        pieces.append(shard.narrow(dim, 0, stop - start))
    return torch.cat(pieces, dim=dim)


def gather_vocab_logits(logits_local: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """Join vocabulary-parallel logits (..., stop - start) into the serial (..., V) on every rank.

    The ranks' slices differ in width when p does not divide V; all-gather needs equal ones, so each is
    padded to ceil(V/p) columns (values never seen: the gathered (..., p·ceil(V/p)) is cut to V).
    """
    p = group_size(group)
    if p == 1:
        return logits_local
    pad = vocab_rows_per_rank(vocab_size, p) - logits_local.shape[-1]
    if pad:
        logits_local = F.pad(logits_local, (0, pad))  # (..., ceil(V/p))
    full = gather_from_tp(logits_local.contiguous(), group)  # (..., p·ceil(V/p))
    return full if full.shape[-1] == vocab_size else full[..., :vocab_size]  # (..., V)


def tp_region_input(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Enter a TP region: (S/p, B, h) sequence shards all-gathered under SP, else (B, S, h) copied."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_tp(x, group)


class _GatherLinears(torch.autograd.Function):
    """Y_i = all_gather(X_local) W_iᵀ for several column-parallel weights, keeping only X_local for the backward.

    Why: under SP the gathered input (S, B, h) is p times the rank's chunk (S/p, B, h); saved by the
    matmuls it would be the largest activation of a block. Megatron's trick: save the chunk and all-gather
    it again in the backward (one more all-gather of the same bytes per region). The backward follows
    autograd's own arithmetic for the unfused path (mm over the flattened tokens; the input gradients
    summed last projection first) and ends with the reduce-scatter gather_from_sequence's backward does.
    With `fuse` and weights back to back in memory (fused_linear.py), the forward is one matmul and the
    backward one for dX and one for dW (the output gradients joined in memory order: join_last_dim, no copy
    when a kernel wrote them as slices of one tensor), and an `epilogue` (fused_linear.Epilogue) transforms
    the fused output in place and its transpose the joined gradient.
    """

    @staticmethod
    def forward(ctx, x_local, group, fuse, epilogue, *weights):
        ctx.group, ctx.epilogue, ctx.weights = group, epilogue, weights  # the parameters: their gradients' slots
        ctx.order = adjacent_order(list(weights)) if fuse else None
        x = all_gather(x_local, SEQUENCE_DIM, group)  # (S, B, in): rank-major is sequence order, no copy
        ctx.save_for_backward(x_local, *weights)
        if ctx.order is None:
            return tuple(F.linear(x, w) for w in weights)  # each (S, B, out_i/p)
        ordered = [weights[i] for i in ctx.order]
        y = F.linear(x, fused_view(ordered))  # (S, B, Σ out/p): one GEMM
        return tuple(split_output(y, ctx.order, [w.shape[0] for w in ordered], epilogue))

    @staticmethod
    def backward(ctx, *grads):
        x_local, *weights = ctx.saved_tensors
        x_flat = all_gather(x_local, SEQUENCE_DIM, ctx.group).flatten(0, -2)  # (S·B, in), gathered again
        if ctx.order is not None:
            ordered = [weights[i] for i in ctx.order]
            sizes = [w.shape[0] for w in ordered]
            g_flat = join_gradients(grads, ctx.order, sizes, ctx.epilogue).flatten(0, -2)  # (S·B, Σ)
            grad_x = g_flat.mm(fused_view(ordered)).view(*grads[0].shape[:-1], -1)  # (S, B, in)
            if weight_gradient_into_slots([ctx.weights[i] for i in ctx.order], g_flat, x_flat):
                grad_weights = [None] * len(weights)  # written into ZeRO's buffer (grad_into_buffer.py)
            else:
                grad_weights = in_caller_order(g_flat.t().mm(x_flat).split(sizes, dim=0), ctx.order)  # (out_i/p, in)
            return (reduce_scatter(grad_x, SEQUENCE_DIM, ctx.group), None, None, None, *grad_weights)
        grad_x, grad_weights = None, []
        for g, w, param in reversed(list(zip(grads, weights, ctx.weights))):
            g_flat = g.reshape(-1, g.shape[-1])  # (S·B, out_i/p)
            gx = g_flat.mm(w)  # (S·B, in)
            grad_x = gx if grad_x is None else grad_x + gx
            into_buffer = weight_gradient_into_slots([param], g_flat, x_flat)
            grad_weights.append(None if into_buffer else g_flat.t().mm(x_flat))  # (out_i/p, in)
        grad_x = grad_x.view(*grads[0].shape[:-1], -1)  # (S, B, in)
        return (reduce_scatter(grad_x, SEQUENCE_DIM, ctx.group), None, None, None, *reversed(grad_weights))


def fuses(layers: list, fuse: bool) -> bool:
    """Whether column_parallel_inputs makes one matmul of `layers` (so that it can take an epilogue)."""
    return (fuse and all(type(m) is ColumnParallelLinear for m in layers)
            and adjacent_order([m.weight for m in layers]) is not None)


def column_parallel_inputs(x: torch.Tensor, layers: list, group, sequence_parallel: bool,
                           fuse: bool = False, epilogue: Epilogue | None = None) -> list[torch.Tensor]:
    """Several column-parallel layers applied to one input x (B, S, h), or (S/p, B, h) under SP.

    Under SP with p > 1 and only ColumnParallelLinear layers, one _GatherLinears: a single all-gather and no
    saved (S, B, h) copy. Otherwise tp_region_input once, then the layers' matmuls (which save the shared
    input). With `fuse`, either way, one matmul for all of them when their weights lie back to back in
    memory (fused_linear.py: ZeRO-1's flat buffer places them so); an `epilogue` then transforms the
    outputs in place (fused_linear.Epilogue; only where `fuses(layers, fuse)`, else ValueError).
    """
    if epilogue is not None and not fuses(layers, fuse):
        raise ValueError("column_parallel_inputs: an epilogue needs one fused matmul (fuse=True, and "
                         "ColumnParallelLinear layers whose weights lie back to back in memory)")
    column = all(type(m) is ColumnParallelLinear for m in layers)
    if sequence_parallel and group_size(group) > 1 and column:
        return list(_GatherLinears.apply(x, group, fuse, epilogue, *[m.weight for m in layers]))
    x_tp = tp_region_input(x, group, sequence_parallel)  # (B, S, h); (S, B, h) under SP
    if fuse and column:
        return linears(x_tp, [m.weight for m in layers], epilogue)  # (B, S, out_i/p) each
    return [m(x_tp, input_is_tp_region=True) for m in layers]


def tp_region_output(y_partial: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Leave a TP region: per-rank partial sums (B, S, h) all-reduced, or under SP (S, B, h) reduce-scattered
    to (S/p, B, h)."""
    return reduce_scatter_to_sequence(y_partial, group) if sequence_parallel else reduce_from_tp(y_partial, group)


class _TPLayer(nn.Module):
    """Group bookkeeping and loading from the serial weight, shared by the layers below."""

    partition_dim: int | None = None
    padded: bool = False
    """True for the vocabulary layers: rows split by vocab_range, zero padding after them (shard_tensor)."""

    def _setup(self, group, sequence_parallel: bool) -> None:
        self.group = group
        self.sequence_parallel = bool(sequence_parallel)
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's slice of the serial layer's full weight."""
        if self.partition_dim is not None:
            full = shard_tensor(full, self.partition_dim, self.tp_size, self.tp_rank, type(self).__name__,
                                padded=self.padded)
        if full.shape != self.weight.shape:
            raise ValueError(f"{type(self).__name__}: weight slice of shape {tuple(full.shape)} does not fit "
                             f"the local weight {tuple(self.weight.shape)}")
        self.weight.copy_(full)

    @classmethod
    def from_full_weight(cls, full: torch.Tensor, group=None, sequence_parallel: bool = False) -> "_TPLayer":
        """The layer of a serial (out, in) / (vocab, h) weight, holding rank r's slice of it."""
        layer = cls(full.shape[1], full.shape[0], group=group, sequence_parallel=sequence_parallel)
        layer.load_full_weight(full)
        return layer


def _local_size(n: int, p: int, what: str) -> int:
    if n % p:
        raise ValueError(f"{what} {n} is not divisible by the tensor-parallel size {p}")
    return n // p


class ColumnParallelLinear(_TPLayer):
    """Y_r = X A_r: weight (out/p, in) = rows [r·out/p, (r+1)·out/p) of the serial weight; output split."""

    partition_dim = 0

    def __init__(self, in_features: int, out_features: int, group=None, sequence_parallel: bool = False):
        super().__init__()
        self._setup(group, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(self._local_rows(out_features), in_features))

    def _local_rows(self, out_features: int) -> int:
        return _local_size(out_features, self.tp_size, "ColumnParallelLinear: out_features")

    def _active_weight(self) -> torch.Tensor:
        """The rows the matmul uses: all of them here (VocabParallelLMHead leaves out its padding)."""
        return self.weight

    def forward(self, x: torch.Tensor, input_is_tp_region: bool = False) -> torch.Tensor:
        """x (B, S, in) -> (B, S, out/p), or under SP (S/p, B, in) -> (S, B, out/p). With input_is_tp_region,
        x is already tp_region_input(...)'s (B, S, in) / (S, B, in)."""
        weight = self._active_weight()  # (out/p, in)
        if not input_is_tp_region:
            if self.sequence_parallel and self.tp_size > 1:  # the chunk, not the gathered input, is saved
                return _GatherLinears.apply(x, self.group, False, None, weight)[0]  # (S, B, out/p)
            x = tp_region_input(x, self.group, self.sequence_parallel)  # (B, S, in)
        return linear(x, weight)  # (B, S, out/p); dW into ZeRO's buffer where it can (grad_into_buffer.py)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}"


class RowParallelLinear(_TPLayer):
    """Y = Σ_r X_r A_r: weight (out, in/p) = columns [r·in/p, (r+1)·in/p) of the serial weight."""

    partition_dim = 1

    def __init__(self, in_features: int, out_features: int, group=None, sequence_parallel: bool = False):
        super().__init__()
        self._setup(group, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        in_local = _local_size(in_features, self.tp_size, "RowParallelLinear: in_features")
        self.weight = nn.Parameter(torch.empty(out_features, in_local))

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        """x_local (B, S, in/p) -> (B, S, out), or under SP (S, B, in/p) -> (S/p, B, out)."""
        y_partial = linear(x_local, self.weight)  # (B, S, out): this rank's term of the sum
        return tp_region_output(y_partial, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}"


class VocabParallelLMHead(ColumnParallelLinear):
    """The LM head, column-parallel over a vocabulary p need not divide: weight (ceil(V/p), h) whose rows past
    [vocab_start, vocab_stop) are zero padding. The matmul takes a view of the valid rows, so the logits are
    (B, S, vocab_stop - vocab_start): padded logits never exist (no masked copy of the largest activation),
    and the padding rows' gradient is zero (the view's backward). With p dividing V: ColumnParallelLinear."""

    padded = True

    def _local_rows(self, out_features: int) -> int:
        self.vocab_start, self.vocab_stop = vocab_range(out_features, self.tp_size, self.tp_rank)
        return vocab_rows_per_rank(out_features, self.tp_size)

    def _active_weight(self) -> torch.Tensor:
        n_valid = self.vocab_stop - self.vocab_start
        return self.weight if n_valid == self.weight.shape[0] else self.weight[:n_valid]  # (stop - start, h) view


class VocabParallelEmbedding(_TPLayer):
    """Rows vocab_range(V, p, r) = [vocab_start, vocab_stop) of the serial (V, h) table, then zero padding up
    to ceil(V/p) rows (rows [r·V/p, (r+1)·V/p) when p divides V); ids outside the range give zeros here."""

    partition_dim = 0
    padded = True

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, sequence_parallel: bool = False):
        super().__init__()
        self._setup(group, sequence_parallel)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_stop = vocab_range(num_embeddings, self.tp_size, self.tp_rank)
        self.weight = nn.Parameter(torch.empty(vocab_rows_per_rank(num_embeddings, self.tp_size), embedding_dim))

    @classmethod
    def from_full_weight(cls, full, group=None, sequence_parallel=False):
        layer = cls(full.shape[0], full.shape[1], group=group, sequence_parallel=sequence_parallel)
        layer.load_full_weight(full)
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) ids in [0, V) -> (B, S, h); under SP tokens (S, B) -> (S/p, B, h)."""
        if self.tp_size == 1:  # the table's gradient goes into ZeRO's buffer where it can (grad_into_buffer.py)
            return embedding(tokens, self.weight)  # (B, S, h)
        local_ids = tokens - self.vocab_start  # (B, S)
        foreign = (local_ids < 0) | (local_ids >= self.vocab_stop - self.vocab_start)  # (B, S): not a row of ours
        x_partial = embedding(local_ids, self.weight, foreign)  # (B, S, h): zero value and zero gradient there
        return tp_region_output(x_partial, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}"


class TPReplicatedLinear(_TPLayer):
    """Full weight (out, in) on every rank, for KV projections whose heads do not split evenly over p.

    Each rank may use only some output rows (`rows`: the KV heads its query heads read), so its weight
    gradient is partial; the weight passes through copy_to_tp so the backward sums it over the group and
    every rank ends the backward with the serial gradient (one all-reduce of the weight per backward).
    The input must already be in the TP region (tp_region_input).
    """

    partition_dim = None

    def __init__(self, in_features: int, out_features: int, group=None, sequence_parallel: bool = False):
        super().__init__()
        self._setup(group, sequence_parallel)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x_tp: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """x_tp (B, S, in) -> (B, S, len(rows)): only the requested output rows are computed."""
        return F.linear(x_tp, copy_to_tp(self.weight, self.group)[rows])
