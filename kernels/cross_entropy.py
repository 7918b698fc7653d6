"""Cross-entropy over a (possibly vocabulary-parallel) logits matrix, without fp32 logits or a softmax.

Why a kernel: with a 32k vocabulary and 8k tokens, the logits are 0.5 GB in bf16; torch's cross-entropy
upcasts them to fp32 and keeps a log-softmax of the same size for the backward. Here the forward streams
each row once in blocks with an online max / sum-exp in fp32 and keeps only logsumexp per row (N floats);
the backward streams the row again and writes the gradient straight in the logits' dtype:

    loss = (1 / n_valid) * sum_{rows r not ignored} (logsumexp(x_r) - x_r[t_r])
    dx_r = (softmax(x_r) - onehot(t_r)) * grad_out / n_valid          (0 for ignored rows)

Vocabulary parallelism (Megatron's vocab-parallel cross-entropy; `group=` a process group of p ranks):
rank r holds the columns [r * V_local, (r + 1) * V_local) of the logits, or, given `vocab_start` and
`vocab_size`, the columns [vocab_start, vocab_start + its width) of a V the ranks split unevenly (a
vocabulary p does not divide: the last rank's slice is narrower, its padding never computed, so it never
enters the softmax). Per row, each rank computes its local logsumexp l_r and, where it owns the target
column, the target logit. Then

    M   = max_r l_r                                  all-reduce MAX, (N,) fp32
    lse = M + log(sum_r exp(l_r - M)),  x[t] = sum_r  one all-reduce SUM of (2, N) fp32

Nothing of vocabulary size crosses ranks, and the backward is local: each rank writes its own columns
of the gradient from the global lse. Costs: forward reads the logits once; backward reads them once more
and writes the gradient once.

Targets outside the vocabulary: `check_targets=True` (the default) raises, at the cost of one tiny
device-to-host sync; the training step passes False (its data side has already checked the ids), and
the kernel still makes such a row's loss NaN, so a bad id is never silently a finite loss (the training
loop skips a step whose loss is not finite).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from ._interpreter import cast_rne as _cast
from ._interpreter import exact_bf16 as _exact_bf16


@triton.jit
def _ce_forward_kernel(logits_ptr, targets_ptr, lse_ptr, target_logit_ptr,
                       n_cols, stride_row, vocab_start, vocab_size, ignore_index, BLOCK_V: tl.constexpr):
    """One program per row: local logsumexp and (if this shard owns it) the target logit, both fp32.

    A target outside [0, vocab_size) that is not ignore_index gets a NaN logsumexp, so its loss is NaN.
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
    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(x - m)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A block of -inf logits (masked vocabulary) before any finite one would give exp(-inf + inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)
    out_of_vocab = valid & ((target < 0) | (target >= vocab_size))
    lse = tl.where(out_of_vocab, float("nan"), lse)
    target_logit = tl.load(row_ptr + tl.where(owned, local_target, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _ce_backward_kernel(logits_ptr, grad_ptr, targets_ptr, lse_ptr, scale_ptr,
                        n_cols, stride_row, stride_grad_row, vocab_start, ignore_index,
                        BLOCK_V: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One program per row: grad = (exp(x - lse) - onehot) * scale, written in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local_target = target - vocab_start
    lse = tl.load(lse_ptr + row)
    row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)  # grad_out / n_valid, 0 for ignored rows
    n_read = tl.where(valid, n_cols, 0)  # ignored rows load nothing (-inf gives p = 0) and write zeros
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse)
        grad = (p - tl.where(cols == local_target, 1.0, 0.0)) * row_scale
        tl.store(grad_row_ptr + cols, _cast(grad, grad_ptr.dtype.element_ty, EXACT_BF16), mask=cols < n_cols)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): blocks of up to 4096 columns, 16 fp32 per thread at 8 warps."""
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


def _combine_over_vocab_shards(lse_local, target_logit, group):
    """Global logsumexp and target logit from each rank's shard: two (N,)-sized all-reduces."""
    lse_max = lse_local.clone()  # (N,)
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    # Ranks whose shard is all -inf for a row contribute exp(-inf) = 0; the max is finite somewhere.
    stats = torch.stack([torch.exp(lse_local - lse_max), target_logit])  # (2, N)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return lse_max + torch.log(stats[0]), stats[1]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, group, check_targets, vocab_start, vocab_size):
        n_rows, n_cols = logits.shape
        rank = 0 if group is None else dist.get_rank(group)
        world = 1 if group is None else dist.get_world_size(group)
        if vocab_start is None:  # an even split: rank r's columns start at r * width
            vocab_start, vocab_size = rank * n_cols, n_cols * world
        if check_targets:
            _check_targets(targets, vocab_size, ignore_index)
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (N,)
        target_logit = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (N,)
        block_v, num_warps = _launch_config(n_cols)
        if n_rows > 0:
            _ce_forward_kernel[(n_rows,)](
                logits, targets, lse, target_logit, n_cols, logits.stride(0), vocab_start, vocab_size,
                ignore_index, BLOCK_V=block_v, num_warps=num_warps)
        if group is not None:
            lse, target_logit = _combine_over_vocab_shards(lse, target_logit, group)
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum().clamp(min=1).float()  # stays on device: no sync; 1 when all are ignored
        loss = torch.where(valid, lse - target_logit, 0.0).sum() / n_valid
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index, ctx.vocab_start = ignore_index, vocab_start
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, n_valid = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V_local), logits' dtype
        scale = (grad_loss.float() / n_valid).reshape(1)  # (1,) read in the kernel: no host sync
        block_v, num_warps = _launch_config(n_cols)
        if n_rows > 0:
            _ce_backward_kernel[(n_rows,)](
                logits, grad, targets, lse, scale, n_cols, logits.stride(0), grad.stride(0),
                ctx.vocab_start, ctx.ignore_index, BLOCK_V=block_v, EXACT_BF16=_exact_bf16(logits.dtype),
                num_warps=num_warps)
        return grad, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  group: "dist.ProcessGroup | None" = None, check_targets: bool = True,
                  vocab_start: int | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over targets != ignore_index; a 0-dim fp32 tensor (0 if all are ignored).

    logits: (N, V) any float dtype, or with `group` this rank's (N, V / p) slice of the vocabulary
    (rank r holds columns [r * V/p, (r + 1) * V/p)); targets: (N,) int64 ids into the full vocabulary.
    `vocab_start` and `vocab_size` (both, with `group`): this rank's columns are the ids
    [vocab_start, vocab_start + width) of a vocabulary of vocab_size ids the ranks split unevenly.
    Differentiable in logits; the gradient has the logits' dtype. `check_targets=False` skips the
    host-synchronising range check (an out-of-range target then gives a NaN loss).
    """
    _check_inputs(logits, targets)
    if logits.stride(1) != 1:  # rows may be strided; columns are streamed and must be contiguous
        logits = logits.contiguous()
    targets = targets.contiguous()  # the kernels read targets_ptr + row: a strided view would be misread
    if (vocab_start is None) != (vocab_size is None) or (vocab_start is not None and group is None):
        raise ValueError("cross_entropy: vocab_start and vocab_size go together, and only with a group")
    return _CrossEntropy.apply(logits, targets, int(ignore_index), group, bool(check_targets), vocab_start,
                               vocab_size)


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Plain torch: F.cross_entropy on fp32-upcast logits, mean over non-ignored rows (0 if none)."""
    per_row = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")  # (N,)
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return per_row.sum() / n_valid
