"""Where ZeRO-1 puts each parameter: buckets in backward order, each bucket split over the DP ranks.

Why a file of its own: the optimizer, `megamath reshard` (which writes optimizer shards for a model it
never builds) and `megamath plan` (which predicts the buffers' bytes before launch) must agree on one
layout, so it is a pure function of (names, shapes, TP-split flags, dp size, bucket size) with no tensors.

The layout (Megatron-LM's distributed optimizer):

    flat buffer  | bucket 0 (last layers)          | bucket 1                 | ... | bucket B-1 (embedding) |
    one bucket   | rank 0's L | rank 1's L | ...   (L = bucket length / dp, a multiple of ALIGN)

Parameters go into the flat buffer in the reverse of the model's order (the order the backward produces
their gradients: lm_head first, embed_tokens last) and are grouped into buckets of about `bucket_numel`
elements, never splitting a parameter. Each bucket is padded to a multiple of dp · ALIGN and cut into dp
equal, contiguous pieces: DP rank r owns piece r of every bucket. So a bucket's reduce-scatter can start as
soon as its own gradients are final, without waiting for the rest of the backward, and its all-gather
after the update is needed only when the forward reaches its layers.

A rank's optimizer shard (fp32 master, exp_avg, exp_avg_sq) is its pieces of all buckets concatenated
in bucket order: shard_size = Σ_b len_b / dp. One bucket holding everything (bucket_numel 0) is the
previous rank-major layout `[r·S, (r+1)·S)`; checkpoints of that layout (format v1) are read through
`saved_layout`, which treats them as exactly that: one bucket.

Bytes on one rank, per element of the padded buffer: param 2 (bf16) + grad 4 (fp32) or 2 (bf16), and
per element of the shard 12 (master, exp_avg, exp_avg_sq in fp32). `buffer_bytes` is that arithmetic, and
what the optimizer allocates.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

GRAD_BYTES = {"bf16": 2, "fp32": 4}
"""Bytes per element of the gradient buffer for each `optimizer.grad_dtype`."""


def resolve_grad_dtype(setting: str, bf16_weights: bool, dp: int, tp: int, micro_batches: int | None) -> str:
    """The gradient buffer's dtype ("bf16" or "fp32") for `optimizer.grad_dtype` = setting.

    "auto" is "bf16" when nothing is ever summed into the buffer: bf16 weights (so autograd's gradients are
    bf16), one micro-batch per step (`micro_batches` 1; None, unknown, counts as more), one DP rank and one
    TP rank (no reduce-scatter, no sequence-parallel sum). Each slot then holds one bf16 gradient as autograd
    computes it; an fp32 buffer taking autograd's gradients would hold the very same values in twice the
    bytes, and its readers (the norm, in fp64, and AdamW, in fp32) widen them either way: the step is the
    same, and per parameter 2 bytes of memory and 6 of memory traffic are saved (the copy's write, the norm's
    and AdamW's reads). (With gradient-accumulation fusion an fp32 buffer holds more: the linear weights'
    products before their rounding to bf16, grad_into_buffer.py; "auto" trades that for speed where no sum
    needs it.) Wherever a sum enters the buffer, "fp32", which rounds it once, at the end.
    """
    if setting != "auto":
        return setting
    return "bf16" if bf16_weights and dp == 1 and tp == 1 and micro_batches == 1 else "fp32"


ALIGN = 64
"""Each rank's piece of a bucket is a multiple of 64 elements (128 B in bf16), so every shard piece and
every collective starts aligned for the GPU's vector loads and NCCL."""


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the flat buffers."""

    name: str
    numel: int
    offset: int
    decay: bool
    tensor_parallel: bool
    bucket: int = 0
    """Index of the bucket holding it (its gradient's reduce-scatter and its weight's all-gather)."""


@dataclass(frozen=True)
class Bucket:
    """[start, end) of the flat buffers; end - start is a multiple of dp, rank r owns the r-th dp-th of it."""

    start: int
    end: int
    shard_offset: int
    """Where this bucket's piece begins in every rank's shard (Σ of the earlier buckets' pieces)."""

    def piece(self, dp_size: int) -> int:
        return (self.end - self.start) // dp_size


@dataclass(frozen=True)
class ZeroLayout:
    slots: list[ParamSlot]
    """In flat-buffer (backward) order."""
    buckets: list[Bucket]
    dp_size: int
    numel: int
    """Elements of the parameters (no padding)."""

    @property
    def padded_numel(self) -> int:
        """Elements of the flat parameter and gradient buffers."""
        return self.buckets[-1].end

    @property
    def shard_size(self) -> int:
        """Elements of each rank's fp32 master, exp_avg and exp_avg_sq."""
        return sum(b.piece(self.dp_size) for b in self.buckets)

    def rank_pieces(self, dp_rank: int) -> list[tuple[int, int, int]]:
        """Rank dp_rank's pieces, in bucket order: (flat_start, flat_end, shard_start)."""
        out = []
        for b in self.buckets:
            n = b.piece(self.dp_size)
            out.append((b.start + dp_rank * n, b.start + (dp_rank + 1) * n, b.shard_offset))
        return out


def zero_layout(params: list[tuple[str, tuple[int, ...], bool]], dp_size: int, bucket_numel: int = 0) -> ZeroLayout:
    """The layout of parameters (name, shape, tensor_parallel), given in the model's order.

    bucket_numel: close a bucket once it holds at least this many elements; 0 puts everything in one.
    """
    if dp_size < 1:
        raise ValueError(f"zero_layout: dp_size must be >= 1, got {dp_size}")
    unit = dp_size * ALIGN
    slots, buckets, offset, start = [], [], 0, 0

    def close() -> None:
        nonlocal offset, start
        end = start + max(unit, -(-(offset - start) // unit) * unit)
        shard_offset = buckets[-1].shard_offset + buckets[-1].piece(dp_size) if buckets else 0
        buckets.append(Bucket(start, end, shard_offset))
        offset = start = end

    for name, shape, split in reversed(params):
        numel = math.prod(shape)
        slots.append(ParamSlot(name, numel, offset, len(shape) >= 2, split, len(buckets)))
        offset += numel
        if bucket_numel > 0 and offset - start >= bucket_numel:
            close()
    if offset > start or not buckets:
        close()
    return ZeroLayout(slots, buckets, dp_size, sum(s.numel for s in slots))


def bucket_numel_for(bucket_mb: float, grad_bytes: int) -> int:
    """Elements of a bucket of bucket_mb MiB of gradients (0: one bucket). At least 1 for any bucket_mb > 0: a
    size below one gradient means a bucket per parameter, never 0's one bucket."""
    return max(1, int(bucket_mb * 2**20) // grad_bytes) if bucket_mb > 0 else 0


def buffer_bytes(layout: ZeroLayout, param_bytes: int, grad_bytes: int) -> dict[str, int]:
    """The bytes ZeroOptimizer allocates on one rank for this layout (its own arithmetic, see the class)."""
    return {"params": layout.padded_numel * param_bytes, "grads": layout.padded_numel * grad_bytes,
            "optimizer": 3 * 4 * layout.shard_size}


# ---- reading saved shards of any layout ------------------------------------------------------------------

def saved_layout(shard: dict) -> tuple[list[Bucket], int]:
    """(buckets, dp_size) of a saved optimizer shard; a v1 shard (rank-major) is one bucket."""
    dp = shard["dp_size"]
    if "buckets" in shard:
        buckets, shard_offset = [], 0
        for start, end in shard["buckets"]:
            buckets.append(Bucket(start, end, shard_offset))
            shard_offset += (end - start) // dp
        return buckets, dp
    size = shard["shard"][1] - shard["shard"][0]
    return [Bucket(0, dp * size, 0)], dp


def read_flat(shards: list, buckets: list[Bucket], dp_size: int, start: int, n: int):
    """Elements [start, start + n) of the flat vector that `shards` (tensors, in DP-rank order) hold in
    the layout `buckets`, as one tensor (a view when they lie in one piece)."""
    import torch  # only here: the layout itself needs no torch

    starts = [b.start for b in buckets]
    pieces = []
    while n > 0:
        b = buckets[bisect.bisect_right(starts, start) - 1]
        size = b.piece(dp_size)
        rank, local = divmod(start - b.start, size)
        take = min(n, size - local)
        pieces.append(shards[rank][b.shard_offset + local:b.shard_offset + local + take])
        start, n = start + take, n - take
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
