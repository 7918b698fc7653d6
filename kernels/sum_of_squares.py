"""Σ x² of a flat gradient buffer in float64, reading it once: the gradient norm's pass.

Why a kernel: ZeRO-1's gradient norm sums the squares of every gradient in fp64 (an fp32 sum over
millions of elements drifts by ~1e-4 relative on a CPU, enough to move the clip coefficient).
`torch.linalg.vector_norm(x, dtype=torch.float64)` does that by first copying x to fp64: for a bf16
buffer it reads 2 bytes per element, writes 8 and reads them again, 18 in all, and allocates the copy (8
bytes per element of the largest range; several GB at Code Llama 7B's width). At 1.07 B bf16 gradients
that is ~19 GB of memory traffic, ~6 ms of an H100's ~3.3 TB/s, against the ~0.7 ms of reading the buffer
once (arithmetic, not a timing). Here each program squares and sums a chunk of CHUNK elements in fp64
registers (converted as loaded; fp64 arithmetic is far below what the loads cost on A100/H100) and writes
one fp64 partial; torch sums the partials (one per 16,384 elements) in fp64. The squares are exact, as in
the reference; only the order of the fp64 additions differs from it.

    sum_of_squares(x)      x: 1-D contiguous fp32/bf16/fp16  ->  () fp64
    sum_of_squares_ref(x)  torch.linalg.vector_norm(x, dtype=float64) ** 2, what the optimizer ran before
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
"""Elements per program per iteration (4 warps: 8 fp64 accumulators a thread)."""
CHUNK = 16 * BLOCK
"""Elements per program: one fp64 partial each, so 1 B elements leave 61 K partials for torch to sum."""


@triton.jit
def _sum_of_squares_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.float64)  # (BLOCK,)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        offs = start + offset + tl.arange(0, BLOCK)  # (BLOCK,)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
        acc += x * x
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _check(x: torch.Tensor) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"sum_of_squares: x must be a contiguous 1-D buffer, got shape {tuple(x.shape)} with strides "
                         f"{x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"sum_of_squares: x must be float32, bfloat16 or float16, got {x.dtype}")


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² in float64, a () tensor on x's device (no host sync): one read of x, no copy of it."""
    _check(x)
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    partials = torch.empty(triton.cdiv(n, CHUNK), dtype=torch.float64, device=x.device)  # (P,)
    _sum_of_squares_kernel[(partials.numel(),)](x, partials, n, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=4)
    return partials.sum()


def sum_of_squares_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: the fp64 norm squared (through an fp64 copy of x)."""
    _check(x)
    return torch.linalg.vector_norm(x, dtype=torch.float64) ** 2
