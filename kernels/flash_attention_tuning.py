"""Flash-attention tiles chosen by measurement on the GPU at hand, once, for the run's own shape.

Why: the fastest tiles depend on the GPU (an H100 has 228 KiB of shared memory per SM, an A100 164 KiB;
their tensor cores and register files differ), on head_dim and dtype, and on the sequence length. One fixed
set was measured on an H100 at D 128 to be 25-30 % slower than SDPA's flash backend (a figure from scratch
runs quoted in the issue; no perf/results/ file holds it), and a table per GPU would be guesses until
someone measures every cell. So `tune_flash_attention` times a short list of candidates on the caller's
shape and memory layout (views of a fused projection, sequence first or not): forward tiles and backward
tiles separately (they are independent kernels), keeps the fastest of each, and registers the pair for that
head_dim and dtype (flash_attention.use_blocks), so every later call uses it. A candidate that does not
fit this GPU (shared memory, registers) fails to compile or launch and is skipped; one whose results differ
from the default tiles' beyond bf16 rounding is rejected (a tile-specific bug must never become the
fastest). The cost is one compile per candidate at start-up, spread over the
host's CPU threads (`compile_in_parallel`). fp32 attention (for checks, not speed) is not tuned.

The candidates, (queries, keys, warps, stages, TMA) forward and (dK/dV queries, dK/dV keys, dQ queries, dQ
keys, warps, stages, atomic dQ, TMA) backward: the current default first, then FlashAttention-2's larger
Hopper/Ampere tiles (128 queries, 8 warps), which need fewer programs and reload K/V less often but hold
twice the fp32 accumulators, and the default tiles spread over 8 warps (fewer registers per thread). Two
backward candidates add dQ inside the dK/dV kernel with fp32 atomics (FlashAttention-2's scheme: 5 matmuls
per block pair instead of 7, in exchange for atomic traffic); their sums vary in the last bits from run to
run, so they are not tried when torch.use_deterministic_algorithms(True) is in force. Five candidates
(marked TMA) load their loops' tiles through Hopper's tensor memory accelerator instead of per-thread loads;
at head_dim 128 the compiler's output holds 17-47 fewer registers per thread than at the same tiles without
it (Triton 3.6 and 3.9, sm_90a), and registers are what the larger tiles were short of. Triton compiles them
for an A100 into code that spills tens of KB per thread, so they are tried only on compute capability 9.0
and later. Every candidate compiles for an H100 at head_dim 64 and 128 without spilling registers, within
shared memory, with wgmma dots only (`perf/kernel_resources.py` shows this without a GPU); two earlier ones
spilled 272 and 336 bytes there and were replaced. The TMA candidates have not been timed on a GPU yet:
the tuner is what lets a GPU decide whether they help.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ._interpreter import interpreting
from .flash_attention import (check_blocks, check_inputs, flash_attention_blocks, flash_attention_bwd, flash_attention_fwd,
                              tma_available, use_blocks)

FORWARD_CANDIDATES = ((64, 64, 4, 3, False), (128, 64, 8, 3, False), (64, 64, 8, 3, False), (128, 128, 8, 2, False),
                      (64, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 128, 8, 2, True))
"""(fwd_m, fwd_n, fwd_warps, fwd_stages, fwd_tma); the first is the default."""
BACKWARD_CANDIDATES = ((32, 64, 64, 32, 4, 4, False, False), (32, 128, 128, 32, 8, 2, False, False),
                       (32, 64, 64, 32, 8, 4, False, False), (64, 64, 64, 64, 8, 3, False, False),
                       (32, 64, 64, 32, 8, 4, True, False), (32, 128, 128, 32, 8, 2, True, False),
                       (32, 64, 64, 32, 4, 4, False, True), (32, 64, 64, 32, 8, 4, False, True))
"""(bwd_kv_m, bwd_kv_n, bwd_q_m, bwd_q_n, bwd_warps, bwd_stages, bwd_atomic_dq, bwd_tma); the first is the
default."""
_FORWARD_FIELDS = ("fwd_m", "fwd_n", "fwd_warps", "fwd_stages", "fwd_tma")
_BACKWARD_FIELDS = ("bwd_kv_m", "bwd_kv_n", "bwd_q_m", "bwd_q_n", "bwd_warps", "bwd_stages", "bwd_atomic_dq",
                    "bwd_tma")


@dataclass(frozen=True)
class TunedBlocks:
    blocks: object
    """The FlashAttentionBlocks now registered for this head_dim and dtype."""
    forward_ms: dict
    """Candidate label -> median forward time in ms, or a string saying why it was skipped."""
    backward_ms: dict
    """The same for the backward (dK/dV and dQ kernels together)."""

    def summary(self) -> str:
        """One line for the run's log: the chosen tiles against the default ones."""
        parts = []
        for what, timings in (("forward", self.forward_ms), ("backward", self.backward_ms)):
            timed = {label: ms for label, ms in timings.items() if isinstance(ms, float)}
            if not timed:
                parts.append(f"{what} untuned")
                continue
            best, default = min(timed, key=timed.get), next(iter(timings))
            versus = f", default {default} {timed[default]:.3f} ms" if default in timed and best != default else ""
            parts.append(f"{what} {best} {timed[best]:.3f} ms{versus}")
        return "flash-attention tiles: " + "; ".join(parts)

    def timings(self) -> str:
        """Every candidate's median (or why it was skipped), one per line: what a GPU run teaches."""
        return "\n".join(f"  {what} {label}: {f'{ms:.3f} ms' if isinstance(ms, float) else ms}"
                         for what, timings in (("forward", self.forward_ms), ("backward", self.backward_ms))
                         for label, ms in timings.items())


def _label(values: tuple) -> str:
    """'64x64 w4 s3' (forward), '32x64x64x32 w4 s4' (backward), '32x64 w8 s4 atomic dQ' (no dQ kernel), with
    ' TMA' after tiles whose loop loads go through the tensor memory accelerator."""
    if len(values) == len(_BACKWARD_FIELDS):
        *tiles, warps, stages, atomic_dq, tma = values
        if atomic_dq:
            tiles, stages = tiles[:2], f"{stages} atomic dQ"
    else:
        *tiles, warps, stages, tma = values
    return "x".join(str(t) for t in tiles) + f" w{warps} s{stages}" + (" TMA" if tma else "")


def cuda_time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median of CUDA-event timings of fn, after one untimed call (which compiles the kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compile_in_parallel(compiles: list[Callable[[], object]], workers: int | None = None) -> None:
    """Run compile-only launches with Triton's compiles spread over CPU threads (its AsyncCompileMode; the
    compiler releases the GIL: 4 attention kernels compiled in 2.8 s on 2 threads against 5.3 s on one).

    Why: the tuner's ~22 kernels compiled one after another took most of its start-up time, on a GPU host
    whose other cores sat idle. Best effort: a compile that fails here is left to fail again at the
    candidate's first launch, where `_measure` reports it; a Triton without AsyncCompileMode, and the CPU
    interpreter (nothing to compile), compile at first launch as before."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    if interpreting() or not compiles:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = workers or min(len(compiles), cpus, 16)
    with ThreadPoolExecutor(workers) as pool:
        try:
            with AsyncCompileMode(pool, ignore_errors=True):
                for compile_only in compiles:
                    try:
                        compile_only()
                    except Exception:  # noqa: BLE001 - the candidate's own launch reports it
                        pass
        except RuntimeError:  # a caller's AsyncCompileMode is active: leave the compiles to the first launches
            pass


def _close(got, want) -> bool:
    """Equal up to a few bf16 roundings: tiles change the order of the fp32 sums, nothing else."""
    return all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, want))


def _measure(run: Callable[[], tuple], reference: tuple, time_ms, repeats: int):
    """Median ms of run, or why it was skipped."""
    try:
        if not _close(run(), reference):
            return "rejected: results differ from the default tiles'"
        return float(time_ms(run, repeats))
    except Exception as err:  # out of shared memory or registers on this GPU, or a compile failure
        return f"skipped: {type(err).__name__}"


def _attention_inputs(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device, fused: bool, sequence_first: bool) -> tuple[torch.Tensor, ...]:
    """Random q, k, v and dO (batch, seqlen, h, head_dim) laid out as a model hands them over: head views of
    (batch, seqlen, h·head_dim) projection outputs, or of (seqlen, batch, ·) ones when sequence first (then
    the kernels run their sequence-major variant), q, k and v slices of one output when fused."""
    generator = torch.Generator(device=device).manual_seed(0)
    n0, n1 = (seqlen, batch) if sequence_first else (batch, seqlen)
    counts = (heads, kv_heads, kv_heads)

    def rand(width):
        return torch.randn(n0, n1, width, device=device, dtype=dtype, generator=generator)

    def heads_of(t, h):
        t = t.view(n0, n1, h, head_dim)
        return t.transpose(0, 1) if sequence_first else t

    if fused:
        projections = rand(sum(counts) * head_dim).split([h * head_dim for h in counts], dim=-1)
    else:
        projections = [rand(h * head_dim) for h in counts]
    q, k, v = (heads_of(t, h) for t, h in zip(projections, counts))
    return q, k, v, heads_of(rand(heads * head_dim), heads)


def tune_flash_attention(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device | str, causal: bool = True, repeats: int = 5,
                         time_ms: Callable[[Callable[[], object], int], float] = cuda_time_ms, *,
                         fused: bool = False, sequence_first: bool = False) -> TunedBlocks:
    """Time every candidate on q (batch, seqlen, heads, head_dim), k and v with kv_heads, register the
    fastest forward and backward tiles for (head_dim, dtype), and return them with every timing.

    `time_ms(fn, repeats)` measures one candidate (CUDA events by default; tests pass their own). `fused`
    and `sequence_first` lay the inputs out as the model will (_attention_inputs): slices of one q/k/v
    projection output, sequence first under sequence parallelism, whose kernels read other strides and, when
    sequence first, are a variant of their own (with TMA, other tensor descriptors).
    """
    # Refuse what flash_attention refuses, with its message, before the launchers (which do not validate)
    # hit a Triton compile error (head_dim 80: no power of two) or time a shape no call will take.
    check_inputs(*(torch.empty(batch, seqlen, h, head_dim, dtype=dtype, device="meta")
                    for h in (heads, kv_heads, kv_heads)))
    default = flash_attention_blocks(head_dim, interpret=False, dtype=dtype, tuned=False)
    if dtype == torch.float32:
        use_blocks(head_dim, dtype, None)
        return TunedBlocks(default, {}, {})
    q, k, v, do = _attention_inputs(batch, seqlen, heads, kv_heads, head_dim, dtype, device, fused, sequence_first)
    scale = 1.0 / math.sqrt(head_dim)
    forward_ref = flash_attention_fwd(q, k, v, causal, scale, default)
    o, lse = forward_ref
    backward_ref = flash_attention_bwd(do, q, k, v, o, lse, causal, scale, default)

    def candidate(fields, values):
        return check_blocks(dataclasses.replace(default, **dict(zip(fields, values))))

    def why_not(blocks) -> str:
        """Why a candidate is not tried here ("" when it is)."""
        if (blocks.fwd_tma or blocks.bwd_tma) and not tma_available(device):
            return "skipped: TMA needs compute capability 9.0 or later"
        if blocks.bwd_atomic_dq and torch.are_deterministic_algorithms_enabled():
            return "skipped: deterministic algorithms requested"
        return ""

    forward = {_label(c): candidate(_FORWARD_FIELDS, c) for c in FORWARD_CANDIDATES}
    backward = {_label(c): candidate(_BACKWARD_FIELDS, c) for c in BACKWARD_CANDIDATES}
    skipped = {b: why_not(b) for b in (*forward.values(), *backward.values())}
    compile_in_parallel([lambda b=b: flash_attention_fwd(q, k, v, causal, scale, b, compile_only=True)
                         for b in forward.values() if not skipped[b]]
                        + [lambda b=b: flash_attention_bwd(do, q, k, v, o, lse, causal, scale, b, compile_only=True)
                           for b in backward.values() if not skipped[b]])
    forward_ms = {label: skipped[b] or _measure(lambda b=b: flash_attention_fwd(q, k, v, causal, scale, b),
                                                forward_ref, time_ms, repeats)
                  for label, b in forward.items()}
    backward_ms = {label: skipped[b] or _measure(lambda b=b: flash_attention_bwd(do, q, k, v, o, lse, causal, scale, b),
                                                 backward_ref, time_ms, repeats)
                   for label, b in backward.items()}

    def fastest(timings, candidates):
        timed = [(ms, c) for c, ms in zip(candidates, timings.values()) if isinstance(ms, float)]
        return min(timed, key=lambda t: t[0])[1] if timed else candidates[0]

    blocks = dataclasses.replace(default, **dict(zip(_FORWARD_FIELDS, fastest(forward_ms, FORWARD_CANDIDATES))),
                                 **dict(zip(_BACKWARD_FIELDS, fastest(backward_ms, BACKWARD_CANDIDATES))))
    use_blocks(head_dim, dtype, blocks)
    return TunedBlocks(blocks, forward_ms, backward_ms)
