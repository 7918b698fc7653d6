"""Cross-entropy over a (possibly vocabulary-parallel) logits matrix, without fp32 logits or a softmax.

Why a kernel: with a 32k vocabulary and 8k tokens, the logits are 0.5 GB in bf16; torch's cross-entropy
upcasts them to fp32 and keeps a log-softmax of the same size for the backward. Here the forward streams
each row once in blocks with an online max / sum-exp in fp32 and keeps per row only its max m and
ls = log(sum exp(x - m)) (2N floats; lse = m + ls, never formed: at logits of 1e6 the fp32 rounding of lse
alone is 0.06, which the loss ls - (x[t] - m) and the softmax exp((x - m) - ls) never see); the backward streams the row again and writes the gradient straight in the logits' dtype. A caller that
says which gradient it will send into the loss (`expected_grad`; the training step does) gets that
gradient written by the forward instead, right after the row's logsumexp, while the row is still in cache;
the backward then only checks, on the device, that the expected gradient came:

    loss = (1 / n_valid) * sum_{rows r not ignored} (logsumexp(x_r) - x_r[t_r])
    dx_r = (softmax(x_r) - onehot(t_r)) * grad_out / n_valid          (0 for ignored rows)

Vocabulary parallelism (Megatron's vocab-parallel cross-entropy; `group=` a process group of p ranks):
rank r holds the columns [r * V_local, (r + 1) * V_local) of the logits, or, given `vocab_start` and
`vocab_size`, the columns [vocab_start, vocab_start + its width) of a V the ranks split unevenly (a
vocabulary p does not divide: the last rank's slice is narrower, its padding never computed, so it never
enters the softmax). Per row, each rank computes its local max m_r and log-sum ls_r and, where it owns
the target column, the target logit. Then

    M  = max_r m_r                                          all-reduce MAX, (N,) fp32
    ls = log(sum_r exp(ls_r + m_r - M)),  x[t] = sum_r      one all-reduce SUM of (2, N) fp32

Nothing of vocabulary size crosses ranks, and the backward is local: each rank writes its own columns
of the gradient from the global (M, ls). Costs: forward reads the logits once; backward reads them once more
and writes the gradient once. With `expected_grad` (no `group`: the gradient needs the row's global lse),
the forward reads each row twice, the second time from cache when the rows in flight fit it, and writes
the gradient; the backward reads two scalars per row. That is one pass fewer over the logits (the saving
Liger-Kernel gets by writing the gradient over the logits, here without overwriting them and without its
host read of the loss gradient), and none more when the second read misses the cache.

Targets outside the vocabulary: `check_targets=True` (the default) raises, at the cost of one tiny
device-to-host sync; the training step passes False (its data side has already checked the ids), and
the kernel still makes such a row's loss NaN, so a bad id is never silently a finite loss (the training
loop skips a step whose loss is not finite).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from ._interpreter import cast_rne as _cast
from ._interpreter import exact_bf16 as _exact_bf16


@triton.jit
def _row_logsumexp_parts(row_ptr, n_cols, n_read, BLOCK_V: tl.constexpr):
    """(max, sum of exp(x - max)) over the row's first n_read <= n_cols columns, in blocks, fp32.

    Each lane keeps its own running max and sum across the blocks, and the lanes are combined once, at the
    row's end: no reduction across the program's warps inside the loop, so no barrier holds the next block's
    loads back (a reduction per block, as before, left one block of the row in flight at a time). One exp per
    element: the distance between x and the lane's max, negated, is x's term when the max stays and the old
    sum's rescale when x is the new max."""
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # each lane's running max
    s = tl.zeros((BLOCK_V,), tl.float32)  # each lane's sum of exp(x - m)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        bigger = x > m
        # A lane's max is -inf before its first finite x, a masked x is -inf: 0 in their place where the
        # other is subtracted keeps -inf - -inf (NaN) out of both branches; exp(-inf) is then 0 as wanted.
        m_fin, x_fin = tl.where(m == float("-inf"), 0.0, m), tl.where(x == float("-inf"), 0.0, x)
        e = tl.exp(tl.where(bigger, m - x_fin, x - m_fin))
        s = tl.where(bigger, s * e + 1.0, s + e)
        m = tl.maximum(m, x)
    row_max = tl.max(m, axis=0)
    # A row of -inf logits (masked vocabulary) would give exp(-inf + inf).
    row_safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, tl.sum(s * tl.exp(m - row_safe), axis=0)


@triton.jit
def _store_row_grad(row_ptr, grad_row_ptr, n_cols, n_read, row_max, log_sum, local_target, row_scale,
                    BLOCK_V: tl.constexpr, EXACT_BF16: tl.constexpr):
    """grad = (exp((x - row_max) - log_sum) - onehot) * row_scale over the row, in the gradient's dtype.
    Columns past n_read load -inf (p = 0): an ignored row (n_read 0, row_scale 0) writes zeros without
    reading."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        p = tl.exp((x - row_max) - log_sum)
        grad = (p - tl.where(cols == local_target, 1.0, 0.0)) * row_scale
        tl.store(grad_row_ptr + cols, _cast(grad, grad_row_ptr.dtype.element_ty, EXACT_BF16), mask=cols < n_cols)


@triton.jit
def _ce_forward_kernel(logits_ptr, targets_ptr, max_ptr, log_sum_ptr, target_logit_ptr, grad_ptr, scale_ptr,
                       n_cols, stride_row, stride_grad_row, vocab_start, vocab_size, ignore_index,
                       BLOCK_V: tl.constexpr, WITH_GRAD: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One program per row: the local logsumexp as (row max, log of the sum of exp(x - max)) and (if this
    shard owns it) the target logit, all fp32; with WITH_GRAD also the row's gradient for the scale at
    scale_ptr, the row read again while still cached.

    A target outside [0, vocab_size) that is not ignore_index gets a NaN log-sum, so its loss is NaN (and
    its gradient row NaN).
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row overflows int32 at large N * V
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local_target = target - vocab_start
    owned = valid & (local_target >= 0) & (local_target < n_cols)
    # Ignored rows mask every load, so their logits are never read (a tensor loop bound would skip the
    # loop too, but Triton 3.6's interpreter rejects one).
    n_read = tl.where(valid, n_cols, 0)
    m, s = _row_logsumexp_parts(row_ptr, n_cols, n_read, BLOCK_V)
    m = tl.where(valid, m, 0.0)
    log_sum = tl.where(valid, tl.log(tl.where(valid, s, 1.0)), 0.0)
    out_of_vocab = valid & ((target < 0) | (target >= vocab_size))
    log_sum = tl.where(out_of_vocab, float("nan"), log_sum)
    target_logit = tl.load(row_ptr + tl.where(owned, local_target, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    tl.store(target_logit_ptr + row, target_logit)
    if WITH_GRAD:
        row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        _store_row_grad(row_ptr, grad_ptr + row * stride_grad_row, n_cols, n_read, m, log_sum, local_target,
                        row_scale, BLOCK_V, EXACT_BF16)


@triton.jit
def _ce_backward_kernel(logits_ptr, grad_ptr, targets_ptr, max_ptr, log_sum_ptr, scale_ptr, grad_loss_ptr,
                        expected_ptr,
                        n_cols, stride_row, stride_grad_row, vocab_start, ignore_index,
                        BLOCK_V: tl.constexpr, CHECK_EXPECTED: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One program per row: grad = (exp((x - m) - ls) - onehot) * scale, written in the logits' dtype. With
    CHECK_EXPECTED the forward already wrote it for the loss gradient at expected_ptr: the row is written
    again only when the one at grad_loss_ptr differs (decided here, on the device: no host sync)."""
    redo = True
    if CHECK_EXPECTED:
        redo = tl.load(grad_loss_ptr) != tl.load(expected_ptr)  # NaN != anything: recomputed, NaN
    if redo:
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)  # grad_out / n_valid, 0 for ignored rows
        n_read = tl.where(valid, n_cols, 0)  # ignored rows load nothing (-inf gives p = 0) and write zeros
        _store_row_grad(logits_ptr + row * stride_row, grad_ptr + row * stride_grad_row, n_cols, n_read,
                        tl.load(max_ptr + row), tl.load(log_sum_ptr + row), target - vocab_start, row_scale,
                        BLOCK_V, EXACT_BF16)


def _forward_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the forward: blocks of up to 1024 columns, 8 per thread (one 16-byte bf16
    access), 4 warps: 32 registers on sm_90a, 16 programs (64 warps) per SM.

    Measured, not modelled: on an H200 (8192 x 32016 bf16, forward with the gradient hint and its backward,
    medians of triton.testing.do_bench in one run of perf/bench_kernels.py) this launch took 0.467 ms,
    against 0.569 at 4096 columns x 16 warps, 0.629 at 8192 x 32 and 0.894 at 2048 x 8; torch.compile of the
    reference 0.735 and Liger-Kernel 0.929. The model it replaced kept few rows in flight so that the
    hint's second read of a row would find it in L2; with each lane's own running max and sum (no barrier
    in the loop) filling the SMs pays more. The forward without the gradient launches the same way, so
    that the loss has the same bits with and without the hint.
    """
    block_v = min(triton.next_power_of_2(n_cols), 1024)
    return block_v, max(1, min(4, block_v // 256))


def _backward_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the backward, one pass with nothing to keep in cache: blocks of up to 4096
    columns, 16 fp32 per thread at 8 warps, up to 8 programs per SM."""
    block_v = min(triton.next_power_of_2(n_cols), 4096)
    num_warps = 8 if block_v >= 4096 else 4 if block_v >= 1024 else 2 if block_v >= 256 else 1
    return block_v, num_warps


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy expects logits (N, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("cross_entropy: logits have an empty vocabulary dimension")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy expects targets ({logits.shape[0]},) for logits {tuple(logits.shape)}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"cross_entropy: targets must be int64, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but targets on {targets.device}")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))  # (N,)
    if bool(bad.any()):  # device-to-host sync
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"cross_entropy: target {int(targets[first])} at row {first} is outside the vocabulary "
                         f"[0, {vocab}) and is not ignore_index ({ignore_index})")


def _combine_over_vocab_shards(row_max, log_sum, target_logit, group):
    """The row's global (max, log-sum) and target logit from each rank's shard: two (N,)-sized all-reduces."""
    global_max = row_max.clone()  # (N,)
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # Ranks whose shard is all -inf for a row contribute exp(-inf) = 0; the max is finite somewhere.
    stats = torch.stack([torch.exp(log_sum + (row_max - global_max)), target_logit])  # (2, N)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return global_max, torch.log(stats[0]), stats[1]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, group, check_targets, vocab_start, vocab_size, expected_grad):
        n_rows, n_cols = logits.shape
        rank = 0 if group is None else dist.get_rank(group)
        world = 1 if group is None else dist.get_world_size(group)
        if vocab_start is None:  # an even split: rank r's columns start at r * width
            vocab_start, vocab_size = rank * n_cols, n_cols * world
        if check_targets:
            _check_targets(targets, vocab_size, ignore_index)
        row_max = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (N,)
        log_sum = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (N,)
        target_logit = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (N,)
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum().clamp(min=1).float()  # stays on device: no sync; 1 when all are ignored
        # The gradient in the forward needs this rank's lse to be the row's: not with a vocabulary split.
        early = expected_grad is not None and group is None and ctx.needs_input_grad[0]
        grad = expected = scale = None
        if early:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V), logits' dtype
            expected = torch.full((1,), expected_grad, dtype=torch.float32, device=logits.device)  # a fill: no copy
            scale = expected / n_valid  # (1,): the backward's grad_loss / n_valid when grad_loss is as expected
        block_v, num_warps = _forward_launch(n_cols)
        if n_rows > 0:
            _ce_forward_kernel[(n_rows,)](
                logits, targets, row_max, log_sum, target_logit, grad if early else log_sum,
                scale if early else log_sum,
                n_cols, logits.stride(0), grad.stride(0) if early else 0, vocab_start, vocab_size, ignore_index,
                BLOCK_V=block_v, WITH_GRAD=early, EXACT_BF16=_exact_bf16(logits.dtype), num_warps=num_warps)
        if group is not None:
            row_max, log_sum, target_logit = _combine_over_vocab_shards(row_max, log_sum, target_logit, group)
        # logsumexp - x[t] as log_sum - (x[t] - max): the difference of two logits is exact where the
        # logsumexp's own rounding (at the logits' magnitude: 0.06 at 1e6 in fp32) would be the loss's.
        loss = torch.where(valid, log_sum - (target_logit - row_max), 0.0).sum() / n_valid
        ctx.save_for_backward(logits, targets, row_max, log_sum, n_valid, grad, expected)
        ctx.ignore_index, ctx.vocab_start = ignore_index, vocab_start
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, row_max, log_sum, n_valid, grad, expected = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        early = grad is not None
        if not early:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V_local), logits' dtype
        grad_loss = grad_loss.float().reshape(1)  # (1,) read in the kernel: no host sync
        scale = grad_loss / n_valid  # (1,)
        block_v, num_warps = _backward_launch(n_cols)
        if n_rows > 0:
            _ce_backward_kernel[(n_rows,)](
                logits, grad, targets, row_max, log_sum, scale, grad_loss, expected if early else scale, n_cols,
                logits.stride(0), grad.stride(0), ctx.vocab_start, ctx.ignore_index, BLOCK_V=block_v,
                CHECK_EXPECTED=early, EXACT_BF16=_exact_bf16(logits.dtype), num_warps=num_warps)
        return grad, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  group: "dist.ProcessGroup | None" = None, check_targets: bool = True,
                  vocab_start: int | None = None, vocab_size: int | None = None,
                  expected_grad: float | None = None) -> torch.Tensor:
    """Mean cross-entropy over targets != ignore_index; a 0-dim fp32 tensor (0 if all are ignored).

    logits: (N, V) any float dtype, or with `group` this rank's (N, V / p) slice of the vocabulary
    (rank r holds columns [r * V/p, (r + 1) * V/p)); targets: (N,) int64 ids into the full vocabulary.
    `vocab_start` and `vocab_size` (both, with `group`): this rank's columns are the ids
    [vocab_start, vocab_start + width) of a vocabulary of vocab_size ids the ranks split unevenly.
    Differentiable in logits; the gradient has the logits' dtype. `check_targets=False` skips the
    host-synchronising range check (an out-of-range target then gives a NaN loss).

    `expected_grad`: the gradient the caller will send back into the loss (1.0 for `loss.backward()`, 1/k
    for `(loss / k).backward()`). Given, and without `group`, the forward writes the logits' gradient for it
    in the same pass over each row (the row read again while still in cache) and the backward only checks
    on the device that it came: one pass fewer over the logits. Any other gradient is still exact: the
    backward then writes the gradient again, as without the hint (the forward's write wasted).
    """
    _check_inputs(logits, targets)
    if logits.stride(1) != 1:  # rows may be strided; columns are streamed and must be contiguous
        logits = logits.contiguous()
    targets = targets.contiguous()  # the kernels read targets_ptr + row: a strided view would be misread
    if (vocab_start is None) != (vocab_size is None) or (vocab_start is not None and group is None):
        raise ValueError("cross_entropy: vocab_start and vocab_size go together, and only with a group")
    if expected_grad is not None and (isinstance(expected_grad, bool) or not isinstance(expected_grad, (int, float))
                                      or not math.isfinite(expected_grad)):
        raise ValueError(f"cross_entropy: expected_grad must be a finite number or None, got {expected_grad!r}")
    return _CrossEntropy.apply(logits, targets, int(ignore_index), group, bool(check_targets), vocab_start,
                               vocab_size, None if expected_grad is None else float(expected_grad))


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Plain torch: F.cross_entropy on fp32-upcast logits, mean over non-ignored rows (0 if none)."""
    per_row = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")  # (N,)
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return per_row.sum() / n_valid
