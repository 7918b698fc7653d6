"""The embedding table's gradient, written or added straight into a gradient buffer, deterministically.

    out[v]  = Σ_{i : ids[i] = v} grad[i]          (add=False: every row written, untouched rows zero)
    out[v] += Σ_{i : ids[i] = v} grad[i]          (add=True: untouched rows neither read nor written)

with the sum in fp32 in token order, added to out's value in fp32 and stored once in out's dtype; ids outside
[0, V) (a vocabulary-parallel rank's foreign tokens) add nothing.

Why a kernel: autograd's embedding backward returns a dense (V, D) gradient in the weight's dtype, which
ZeRO-1's hook then copies or adds into the buffer. At Code Llama 7B's vocabulary (32,016 × 4,096 in bf16,
an fp32 buffer) that is per micro-batch a zeroed 0.26 GB tensor, the tokens' rows scattered into it, read
back, and the fp32 buffer written (first micro-batch, ~1 GB of traffic) or read and written (later ones,
~1.6 GB): ~0.3-0.5 ms of an H100's ~3.3 TB/s (arithmetic, not a timing), plus a bf16 rounding of every
row's sum before the fp32 buffer adds it. Here the first micro-batch writes the buffer once (0.5 GB) and a
later one reads and writes only the rows its tokens touch (~0.1 GB at 4,096 tokens). `index_add_` into the
buffer would do it with atomics, whose order (and so whose fp32 sum) changes from run to run; instead the
ids are sorted (stable: token order within a row), `searchsorted` finds each row's tokens, and one program
per (row, column block) sums them in order. Adding, the rows are those of the tokens: one program per
(sorted token position, column block), and the one at the start of a run of equal ids sums the run into its
row, so a later micro-batch launches N programs where writing launches V. No step of it reads anything back
to the host.

    embedding_backward(grad, ids, out, add)      grad (N, D) float, ids (N,) int, out (V, D) fp32/bf16/fp16
    embedding_backward_ref(grad, ids, out, add)  plain torch (index_add_ into an fp32 table: in token order
                                                 on a CPU, with atomics on CUDA)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import cast_rne as _cast
from ._interpreter import exact_bf16
from ._layout import rows_2d

MAX_BLOCK_D = 1024
"""Columns per program (4 warps: 8 fp32 accumulators a thread, 16-byte loads and stores)."""
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _embedding_backward_kernel(grad_ptr, order_ptr, sorted_ids_ptr, starts_ptr, ends_ptr, out_ptr, V, D,
                               stride_grad, stride_out, ADD: tl.constexpr, BLOCK_D: tl.constexpr,
                               EXACT_BF16: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = cols < D
    if ADD:  # program p: sorted position p, which starts a run of equal ids or does nothing
        position = tl.program_id(0).to(tl.int64)
        row = tl.load(sorted_ids_ptr + position)  # int64
        start = position
        end = tl.load(ends_ptr + position)  # the run's end
        first = tl.load(starts_ptr + position)  # the run's start
        work = (first == position) & (row >= 0) & (row < V)  # a foreign id adds nothing
    else:  # program v: row v, its tokens order[starts[v]:ends[v]] (none: written zero)
        row = tl.program_id(0).to(tl.int64)
        start = tl.load(starts_ptr + row)
        end = tl.load(ends_ptr + row)
        work = True
    if work:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(start, end):  # this row's tokens, in token order
            token = tl.load(order_ptr + j).to(tl.int64)
            acc += tl.load(grad_ptr + token * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + row * stride_out + cols
        if ADD:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, _cast(acc, out_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


def _rows(grad: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad as (N, D) rows and ids as (N,), after checking the three."""
    if out.dim() != 2 or out.stride(1) != 1:
        raise ValueError(f"embedding_backward: out must be a (V, D) table with contiguous rows, got shape "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if out.dtype not in _OUT_DTYPES:
        raise TypeError(f"embedding_backward: out must be float32, bfloat16 or float16, got {out.dtype}")
    if not grad.is_floating_point() or grad.shape[-1:] != out.shape[1:]:
        raise ValueError(f"embedding_backward: grad must be floating point with out's row length {out.shape[1]} last, "
                         f"got {grad.dtype} of shape {tuple(grad.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or \
            ids.numel() * out.shape[1] != grad.numel():
        raise ValueError(f"embedding_backward: ids must be integers, one per row of grad, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)} for grad {tuple(grad.shape)}")
    if not grad.device == ids.device == out.device:
        raise ValueError(f"embedding_backward: grad, ids and out must be on one device, got {grad.device}, "
                         f"{ids.device} and {out.device}")
    return rows_2d(grad), ids.reshape(-1)  # (N, D) with unit column stride, (N,)


def embedding_backward(grad: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, add: bool = False) -> torch.Tensor:
    """Write (or, with `add`, add) the table gradient Σ grad[i] over each row's ids into `out`; returns out."""
    grad, ids = _rows(grad, ids, out)
    rows, cols = out.shape
    if rows == 0 or cols == 0:
        return out
    # int64 first: row numbers made in the ids' dtype would wrap (uint8 ids: row 256 is row 0)
    sorted_ids, order = torch.sort(ids.long(), stable=True)  # (N,): equal ids keep their token order
    if add and not len(ids):
        return out
    # Writing, the keys are the rows, (V,): row v's tokens are order[starts[v]:ends[v]]. Adding, they are the
    # sorted ids, (N,): position p's run of equal ids is [starts[p], ends[p]).
    keys = sorted_ids if add else torch.arange(rows, device=ids.device, dtype=sorted_ids.dtype)
    starts = torch.searchsorted(sorted_ids, keys)
    ends = torch.searchsorted(sorted_ids, keys, right=True)
    block = min(MAX_BLOCK_D, triton.next_power_of_2(cols))
    _embedding_backward_kernel[(len(keys), triton.cdiv(cols, block))](
        grad, order, sorted_ids, starts, ends, out, rows, cols, grad.stride(0), out.stride(0), ADD=bool(add),
        BLOCK_D=block, EXACT_BF16=exact_bf16(out.dtype), num_warps=4)
    return out


def embedding_backward_ref(grad: torch.Tensor, ids: torch.Tensor, out: torch.Tensor,
                           add: bool = False) -> torch.Tensor:
    """Plain torch: the rows' fp32 sums by index_add_, then written or added (in fp32) into out."""
    grad, ids = _rows(grad, ids, out)
    inside = (ids >= 0) & (ids < out.shape[0])  # (N,)
    sums = torch.zeros(out.shape, dtype=torch.float32, device=out.device).index_add_(
        0, ids[inside], grad[inside].float())  # (V, D)
    if add:
        rows = inside.new_zeros(out.shape[0]).index_fill_(0, ids[inside], True)  # (V,): rows a token touched
        out[rows] = (out[rows].float() + sums[rows]).to(out.dtype)
    else:
        out.copy_(sums)
    return out
