"""Tuned flash-attention tiles: every candidate computes the same attention, and the tuner keeps the fastest.

The candidates run under Triton's CPU interpreter against flash_attention_ref (forward and backward, causal
and not, a sequence that ends mid-tile), so no tile the tuner may pick on a GPU is untested. The tuner's
choice is checked with a stand-in timer (on a GPU, CUDA events time the real kernels: test_attention_choice
and perf/gpu_check.sh): it registers the fastest forward and backward tiles, skips a candidate that fails,
and rejects one whose results differ from the default tiles'.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamath.kernels import flash_attention_tuning as tuning
from megamath.kernels.flash_attention import (
    FlashAttentionBlocks, check_blocks, flash_attention_blocks, flash_attention_bwd, flash_attention_fwd,
    flash_attention_ref, use_blocks,
)

B, S, H, KV, D = 1, 150, 2, 1, 32  # 150: mid-tile for 32-, 64- and 128-wide tiles
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU check runs these compiled on the GPU


def _inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(B, S, h, D, generator=g).to(DEVICE, dtype) for h in (H, KV, KV, H)]  # q, k, v, do


def _reference(q, k, v, do, causal):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = flash_attention_ref(q, k, v, causal=causal)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _reference_lse(q, k, causal):
    """flash_attention_fwd's lse (B, H, S), fp32: the natural log of the row sums of exp(scale · q·k) over the
    visible keys, from fp32 scores."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) / math.sqrt(D)
    if causal:
        above = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores.logsumexp(dim=-1)


@functools.cache
def _case(causal):
    """((q, k, v, do), the reference's (o, dq, dk, dv), its lse, the default tiles' forward (o, lse)): made once
    per causal mode for every test of a candidate (the tensors are only read)."""
    q, k, v, do = _inputs()
    default = flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16, tuned=False)
    return ((q, k, v, do), _reference(q, k, v, do, causal), _reference_lse(q, k, causal),
            flash_attention_fwd(q, k, v, causal, 1 / math.sqrt(D), default))


def _assert_close_to_reference(names, got, want):
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")


def _blocks(fields, values):
    default = flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16, tuned=False)
    return check_blocks(dataclasses.replace(default, **dict(zip(fields, values))))


def _atomic_dq_blocks():
    """The first backward candidate with atomic dQ (and pointer loads)."""
    values = next(c for c in tuning.BACKWARD_CANDIDATES if dict(zip(tuning._BACKWARD_FIELDS, c))["bwd_atomic_dq"])
    return _blocks(tuning._BACKWARD_FIELDS, values)


@pytest.mark.parametrize("causal", [True, False])
def test_the_default_tiles_match_the_reference(causal):
    """The default forward's o and lse, and the default backward's gradients from them."""
    (q, k, v, do), want, want_lse, (o, lse) = _case(causal)
    default = flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16, tuned=False)
    grads = flash_attention_bwd(do, q, k, v, o, lse, causal, 1 / math.sqrt(D), default)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-4)
    _assert_close_to_reference(("o", "dq", "dk", "dv"), (o, *grads), want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("stage,values", [("forward", c) for c in tuning.FORWARD_CANDIDATES[1:]]
                         + [("backward", c) for c in tuning.BACKWARD_CANDIDATES[1:]])
def test_every_candidate_matches_the_reference(stage, values, causal):
    """A forward candidate: its o, and its lse (the backward reads nothing else of the forward) to 1e-4, where
    the default backward's gradients from it would notice an lse off by δ (they scale by about e^-δ) only from
    δ near their 2e-2 tolerance. A backward candidate: its gradients from the default forward (that forward,
    with the default backward, is test_the_default_tiles_match_the_reference)."""
    (q, k, v, do), want, want_lse, (o, lse) = _case(causal)
    scale = 1 / math.sqrt(D)
    if stage == "forward":
        o, lse = flash_attention_fwd(q, k, v, causal, scale, _blocks(tuning._FORWARD_FIELDS, values))
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-4)
        _assert_close_to_reference(("o",), (o,), want)
    else:
        grads = flash_attention_bwd(do, q, k, v, o, lse, causal, scale, _blocks(tuning._BACKWARD_FIELDS, values))
        _assert_close_to_reference(("o", "dq", "dk", "dv"), (o, *grads), want)


def test_the_tuner_registers_the_fastest_tiles_and_skips_or_rejects_bad_ones(monkeypatch):
    # default, 128x64 w8, 64x64 w8, (128x128 fails), 64x64 TMA, 128x64 TMA, (128x128 TMA fails)
    forward_times = iter([0.9, 0.5, 0.7, 0.6, 0.55])
    # default, (32x128x128x32 rejected), 32x64x64x32 w8, 64x64x64x64 w8, 32x64 atomic dQ, (32x128 atomic
    # rejected), 32x64x64x32 w4 TMA, 32x64x64x32 w8 TMA
    backward_times = iter([2.0, 2.5, 1.5, 1.7, 1.9, 1.6])
    real_fwd, real_bwd = tuning.flash_attention_fwd, tuning.flash_attention_bwd

    def fwd(q, k, v, causal, scale, blocks):
        if blocks.fwd_n == 128:
            raise RuntimeError("out of shared memory")  # what a tile that does not fit this GPU does
        return real_fwd(q, k, v, causal, scale, blocks)

    def bwd(do, q, k, v, o, lse, causal, scale, blocks):
        dq, dk, dv = real_bwd(do, q, k, v, o, lse, causal, scale, blocks)
        return (dq + 1, dk, dv) if (blocks.bwd_kv_m, blocks.bwd_kv_n) == (32, 128) else (dq, dk, dv)

    def fake_time(fn, repeats):
        backward = "flash_attention_bwd" in fn.__code__.co_names  # which kernel the candidate runs
        return next(backward_times if backward else forward_times)

    monkeypatch.setattr(tuning, "flash_attention_fwd", fwd)
    monkeypatch.setattr(tuning, "flash_attention_bwd", bwd)
    try:
        tuned = tuning.tune_flash_attention(1, 40, 2, 1, D, torch.bfloat16, DEVICE, time_ms=fake_time)
        assert (tuned.blocks.fwd_m, tuned.blocks.fwd_n, tuned.blocks.fwd_warps) == (128, 64, 8)
        assert (tuned.blocks.bwd_kv_m, tuned.blocks.bwd_kv_n, tuned.blocks.bwd_q_m, tuned.blocks.bwd_q_n) == (64, 64, 64, 64)
        assert tuned.forward_ms["128x128 w8 s2"] == "skipped: RuntimeError"
        assert tuned.backward_ms["32x128x128x32 w8 s2"].startswith("rejected")
        assert tuned.backward_ms["32x128 w8 s2 atomic dQ"].startswith("rejected")
        assert tuned.backward_ms["32x64 w8 s4 atomic dQ"] == 1.7
        assert tuned.forward_ms["128x64 w8 s3 TMA"] == 0.55 and tuned.backward_ms["32x64x64x32 w8 s4 TMA"] == 1.6
        assert next(forward_times, None) is None and next(backward_times, None) is None  # each timed once
        assert flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16) == tuned.blocks  # registered
        assert flash_attention_blocks(D, interpret=True) != tuned.blocks  # the interpreter keeps its tiles
        assert tuned.summary() == ("flash-attention tiles: forward 128x64 w8 s3 0.500 ms, default 64x64 w4 s3 "
                                   "0.900 ms; backward 64x64x64x64 w8 s3 1.500 ms, default 32x64x64x32 w4 s4 2.000 ms")
        lines = tuned.timings().splitlines()
        assert len(lines) == len(tuning.FORWARD_CANDIDATES) + len(tuning.BACKWARD_CANDIDATES)
        assert "  forward 128x128 w8 s2: skipped: RuntimeError" in lines
        assert "  backward 32x64x64x32 w8 s4 TMA: 1.600 ms" in lines
    finally:
        use_blocks(D, torch.bfloat16, None)
    assert flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16) == \
        flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16, tuned=False)


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_gpu_tiles_match_the_reference(causal):
    """fp32 has its own, smaller GPU tiles (16-row backward blocks); run them here against the reference."""
    q, k, v, do = _inputs(torch.float32)
    want = _reference(q, k, v, do, causal)
    blocks = flash_attention_blocks(D, interpret=False, dtype=torch.float32, tuned=False)
    assert blocks != flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16, tuned=False)
    scale = 1 / math.sqrt(D)
    o, lse = flash_attention_fwd(q, k, v, causal, scale, blocks)
    grads = flash_attention_bwd(do, q, k, v, o, lse, causal, scale, blocks)
    for name, got, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_atomic_dq_on_sequence_major_views():
    """Under sequence parallelism q, k, v are (B, S, H, D) views of (S, B, ·) memory: the fp32 dQ buffer of
    the atomic variant follows q's memory order, so dq comes back sequence-major (with dk and dv, slices of
    one gradient laid out like q, k, v's tensor) and equal to the dense result of the dQ kernel."""
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(S, 2, 2 * H, D, generator=gen).to(DEVICE, torch.bfloat16)  # (S, B, H + 2·KV, D)
    do = torch.randn(S, 2, H, D, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)  # (B, S, H, D)
    q, k, v = (t.transpose(0, 1) for t in (qkv[:, :, :H], qkv[:, :, H:H + KV], qkv[:, :, H + KV:]))
    atomic = _atomic_dq_blocks()
    split = dataclasses.replace(atomic, bwd_atomic_dq=False)
    scale = 1 / math.sqrt(D)
    o, lse = flash_attention_fwd(q, k, v, True, scale, atomic)
    got = flash_attention_bwd(do, q, k, v, o, lse, True, scale, atomic)
    dense = [t.contiguous() for t in (do, q, k, v, o)]
    want = flash_attention_bwd(*dense, lse, True, scale, split)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
        assert g.stride(1) > g.stride(0), g.stride()  # sequence-major: slices of one (S, B, ·) gradient


def test_deterministic_algorithms_keep_the_dq_kernel(monkeypatch):
    """Atomic dQ sums vary in their last bits between runs: under torch.use_deterministic_algorithms the
    tuner does not try those tiles, and tiles registered with atomic dQ run the dQ kernel instead."""
    kernels = importlib.import_module("megamath.kernels.flash_attention")  # the module, not the op it exports
    dq_launches = []
    real_dq_kernel = kernels._bwd_dq_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            dq_launches.append(grid)
            return real_dq_kernel[grid]

    monkeypatch.setattr(kernels, "_bwd_dq_kernel", CountingKernel())
    (q, k, v, do), _, _, (o, lse) = _case(True)  # the default forward: the atomic tiles' own
    atomic = _atomic_dq_blocks()
    default = flash_attention_blocks(D, interpret=False, dtype=torch.bfloat16, tuned=False)
    assert atomic.bwd_atomic_dq and all(getattr(atomic, f) == getattr(default, f) for f in tuning._FORWARD_FIELDS)
    scale = 1 / math.sqrt(D)
    atomic_grads = flash_attention_bwd(do, q, k, v, o, lse, True, scale, atomic)
    assert dq_launches == []  # dQ came from the dK/dV kernel's atomics
    torch.use_deterministic_algorithms(True)
    try:
        kept_grads = flash_attention_bwd(do, q, k, v, o, lse, True, scale, atomic)
        assert len(dq_launches) == 1
        tuned = tuning.tune_flash_attention(1, 40, 2, 1, D, torch.bfloat16, DEVICE, time_ms=lambda fn, r: 1.0)
    finally:
        torch.use_deterministic_algorithms(False)
        use_blocks(D, torch.bfloat16, None)
    for got, want in zip(atomic_grads, kept_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    skipped = {label for label, ms in tuned.backward_ms.items() if ms == "skipped: deterministic algorithms requested"}
    assert skipped == {"32x64 w8 s4 atomic dQ", "32x128 w8 s2 atomic dQ"}  # TMA tiles without atomics still run
    assert not tuned.blocks.bwd_atomic_dq


@pytest.mark.parametrize("heads,kv_heads,head_dim,message", [
    (2, 1, 80, "flash_attention: head_dim 80 is not supported; use one of (16, 32, 64, 128)"),
    (3, 2, D, "flash_attention: heads (3) must be a multiple of kv_heads (2)"),
])
def test_shapes_flash_attention_refuses_are_refused_before_tuning(heads, kv_heads, head_dim, message):
    """A model shape the kernel cannot run gets flash_attention's own error at start-up, not a Triton compile
    error from the unvalidated launchers, and no tiles are registered for it."""
    def never(fn, repeats):
        raise AssertionError("nothing may be timed")

    with pytest.raises(ValueError) as err:
        tuning.tune_flash_attention(1, 16, heads, kv_heads, head_dim, torch.bfloat16, DEVICE, time_ms=never)
    assert str(err.value) == message
    assert flash_attention_blocks(head_dim, interpret=False, dtype=torch.bfloat16) == \
        flash_attention_blocks(head_dim, interpret=False, dtype=torch.bfloat16, tuned=False)


def test_fp32_is_not_tuned():
    tuned = tuning.tune_flash_attention(1, 8, 2, 1, D, torch.float32, DEVICE, time_ms=lambda fn, r: 1 / 0)
    assert (tuned.forward_ms, tuned.backward_ms) == ({}, {})


def test_tiles_the_causal_split_cannot_use_are_refused():
    good = FlashAttentionBlocks(64, 64, 4, 3, 32, 64, 64, 32, 4, 4)
    for field, value, rule in [("fwd_n", 48, "fwd_m must be a multiple of fwd_n"),
                               ("bwd_kv_m", 48, "bwd_kv_m must divide bwd_kv_n"),
                               ("bwd_q_n", 48, "bwd_q_m must be a multiple of bwd_q_n")]:
        with pytest.raises(ValueError, match=rule):
            use_blocks(D, torch.bfloat16, dataclasses.replace(good, **{field: value}))
    assert flash_attention_blocks(D, interpret=False, tuned=True) == flash_attention_blocks(D, interpret=False,
                                                                                           tuned=False)


def test_tma_tiles_are_not_tried_before_hopper(monkeypatch):
    """Triton compiles tensor-descriptor loads for an A100 into code that spills tens of KB per thread, so on
    a GPU below compute capability 9.0 the tuner skips the TMA candidates, saying why, and times the rest."""
    monkeypatch.setattr(tuning, "tma_available", lambda device: False)
    timed = []
    try:
        tuned = tuning.tune_flash_attention(1, 40, 2, 1, D, torch.bfloat16, DEVICE,
                                            time_ms=lambda fn, r: timed.append(fn) or 1.0)
    finally:
        use_blocks(D, torch.bfloat16, None)
    tma = [label for label in (*tuned.forward_ms, *tuned.backward_ms) if label.endswith(" TMA")]
    assert len(tma) == 5
    for label in tma:
        assert (tuned.forward_ms | tuned.backward_ms)[label] == "skipped: TMA needs compute capability 9.0 or later"
    assert len(timed) == len(tuning.FORWARD_CANDIDATES) + len(tuning.BACKWARD_CANDIDATES) - 5
    assert not tuned.blocks.fwd_tma and not tuned.blocks.bwd_tma


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_tma_tiles_on_the_models_views_equal_the_pointer_loads():
    """The model hands attention views of its fused QKV projection, sequence-first under sequence
    parallelism: the TMA tiles read them through (B, S, H * D) or (S, B, H * D) descriptors, with rows past
    the sequence end (mid-tile) filled with zeros, never the next batch element's rows (batch 1 holds NaN,
    which would reach batch 0's outputs). Every output equals the pointer loads' bit for bit."""
    # Tiles of 32 and 64 rows here, so 100 rows (not S): every loop has full blocks, diagonal ones and a tail
    # ending mid-tile, at under half the interpreter's time for 150.
    seqlen = 100
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(seqlen, 2, H + 2 * KV, D, generator=gen).to(DEVICE, torch.bfloat16)  # (S, B, H + 2·KV, D)
    do = torch.randn(seqlen, 2, H, D, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)  # (B, S, H, D)
    kernels = importlib.import_module("megamath.kernels.flash_attention")
    for layout, mode in (("sequence-major", 2), ("batch-major", 1)):
        if layout == "batch-major":
            qkv, do = qkv.transpose(0, 1).contiguous().transpose(0, 1), do.contiguous()
        qkv[:, 1] = float("nan")
        q, k, v = (t.transpose(0, 1) for t in (qkv[:, :, :H], qkv[:, :, H:H + KV], qkv[:, :, H + KV:]))
        assert kernels._tma_views(32, k, v)[1] == kernels._tma_views(32, q, do)[1] == mode
        for causal in (True, False):
            pointer = _blocks(tuning._BACKWARD_FIELDS, tuning.BACKWARD_CANDIDATES[2])
            assert {pointer.fwd_m, pointer.fwd_n, pointer.bwd_kv_m, pointer.bwd_kv_n, pointer.bwd_q_m,
                    pointer.bwd_q_n} == {32, 64} and seqlen > 64  # full tiles, then a tail mid-tile
            tma = dataclasses.replace(pointer, fwd_tma=True, bwd_tma=True)
            scale = 1 / math.sqrt(D)
            o, lse = flash_attention_fwd(q, k, v, causal, scale, pointer)
            o_tma, lse_tma = flash_attention_fwd(q, k, v, causal, scale, tma)
            want = flash_attention_bwd(do, q, k, v, o, lse, causal, scale, pointer)
            got = flash_attention_bwd(do, q, k, v, o, lse, causal, scale, tma)
            assert o[0].isfinite().all() and all(g[0].isfinite().all() for g in got), (layout, causal)
            for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), (o_tma, lse_tma, *got), (o, lse, *want)):
                assert torch.equal(g[0], w[0]), (layout, causal, name)


@pytest.mark.parametrize("fused, sequence_first", [(True, True), (False, False)])
def test_the_tuner_times_the_views_the_model_hands_over(monkeypatch, fused, sequence_first):
    """choose_attention tunes on the run's own layout: q, k, v as head views of one fused projection output or of
    three, sequence first under sequence parallelism (the kernels' sequence-major variant, with TMA its own
    descriptors), and dO in the same memory order, so a TMA candidate is timed on what the run launches."""
    kernels = importlib.import_module("megamath.kernels.flash_attention")
    seen = []

    def recorded(real, inputs):
        """real, recording the inputs of every call; the default tiles' launch (the tuner's reference) runs,
        each candidate gets its result back (only the inputs are checked here; on the CPU interpreter each
        candidate's launch costs ~0.2 s)."""
        results = []

        def launch(*args, **kwargs):
            seen.append(args[:inputs])
            if kwargs.get("compile_only"):
                return real(*args, **kwargs)
            if not results:
                results.append(real(*args, **kwargs))
            return results[0]
        return launch

    monkeypatch.setattr(tuning, "flash_attention_fwd", recorded(tuning.flash_attention_fwd, 3))
    monkeypatch.setattr(tuning, "flash_attention_bwd", recorded(tuning.flash_attention_bwd, 1))
    try:
        tuning.tune_flash_attention(2, 40, H, KV, D, torch.bfloat16, DEVICE, time_ms=lambda fn, r: 1.0, fused=fused,
                                    sequence_first=sequence_first)
    finally:
        use_blocks(D, torch.bfloat16, None)
    (q, k, v), (do,) = seen[0], next(t for t in seen if len(t) == 1)
    assert all(all(a is b for a, b in zip(t, (q, k, v) if len(t) == 3 else (do,))) for t in seen)  # every candidate
    assert q.shape == do.shape == (2, 40, H, D) and k.shape == v.shape == (2, 40, KV, D)
    assert len({t.untyped_storage().data_ptr() for t in (q, k, v)}) == (1 if fused else 3)
    token = (0 if sequence_first else 1)  # the dim whose stride is one projection row
    assert q.stride(token) == ((H + 2 * KV) * D if fused else H * D) and do.stride(token) == H * D
    assert kernels._tma_views(32, q, do)[1] == kernels._tma_views(32, k, v)[1] == (2 if sequence_first else 1)


def test_views_a_descriptor_cannot_describe_take_the_pointer_loads():
    """Heads that are not contiguous (here every other head of a wider tensor), a row stride that is not a
    multiple of 16 bytes, overlapping batch elements or two memory orders in one launch cannot be tensor
    descriptors: those calls run the pointer loads, with equal results."""
    kernels = importlib.import_module("megamath.kernels.flash_attention")
    gen = torch.Generator().manual_seed(10)
    wide = torch.randn(1, S, 2 * H, D, generator=gen).to(DEVICE, torch.bfloat16)
    assert kernels._tma_views(32, wide[:, :, ::2]) == (None, 0)
    odd = torch.randn(1, S, 1, 40, generator=gen).to(DEVICE, torch.bfloat16)[..., :D]  # rows of 80 bytes
    assert odd.stride(1) * 2 % 16 == 0 and kernels._tma_views(32, odd)[1] == 1
    odd = torch.randn(1, S, 1, 36, generator=gen).to(DEVICE, torch.bfloat16)[..., :D]  # rows of 72 bytes
    assert kernels._tma_views(32, odd) == (None, 0)
    overlapping = wide.as_strided((2, S, H, D), (D, 2 * H * D, D, 1))  # batch elements one head apart
    assert kernels._tma_views(32, overlapping) == (None, 0)
    sequence_major = torch.randn(S, 2, H, D, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)
    batch_major = sequence_major.contiguous()
    assert kernels._tma_views(32, sequence_major)[1] == 2 and kernels._tma_views(32, batch_major)[1] == 1
    assert kernels._tma_views(32, sequence_major, batch_major) == (None, 0)  # one launch, one memory order
    q = wide[:, :, ::2]
    pointer = _blocks(tuning._FORWARD_FIELDS, tuning.FORWARD_CANDIDATES[0])
    tma = dataclasses.replace(pointer, fwd_tma=True)
    assert torch.equal(flash_attention_fwd(q, q, q, True, 0.2, tma)[0], flash_attention_fwd(q, q, q, True, 0.2, pointer)[0])


def test_compile_in_parallel_leaves_a_callers_async_compile_alone(monkeypatch):
    """Triton allows one AsyncCompileMode at a time: inside a caller's, the tuner's precompile steps aside (the
    candidates then compile at their first launch) instead of stopping the run's start-up."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    ran = []
    with ThreadPoolExecutor(1) as pool, AsyncCompileMode(pool):
        tuning.compile_in_parallel([lambda: ran.append(1)], workers=1)
    assert ran == []
    tuning.compile_in_parallel([lambda: ran.append(1)], workers=1)  # alone, it runs them
    assert ran == [1]


COMPILE_IN_PARALLEL = """
import dataclasses, importlib, json, sys
import torch
from triton.runtime import driver
sys.path.insert(0, sys.argv[1])
import kernel_resources
fa = importlib.import_module("megamath.kernels.flash_attention")
tuning = importlib.import_module("megamath.kernels.flash_attention_tuning")
driver.set_active(kernel_resources._CompileOnlyDriver(90))  # an H100's compiler, no GPU needed
q = torch.empty(1, 256, 4, 64, dtype=torch.bfloat16)
default = fa.flash_attention_blocks(64, interpret=False, tuned=False)
forward = [dataclasses.replace(default, **dict(zip(tuning._FORWARD_FIELDS, c))) for c in tuning.FORWARD_CANDIDATES[:3]]

def broken():
    raise RuntimeError("a candidate that does not compile")

tuning.compile_in_parallel([lambda b=b: fa.flash_attention_fwd(q, q, q, True, 0.1, b, compile_only=True)
                            for b in forward] + [broken], workers=2)
kernels = [k for cache in fa._fwd_kernel.device_caches.values() for k in cache[0].values()]
print(json.dumps(sorted([k.metadata.num_warps, "mma.sync" in k.asm["ptx"] or "wgmma" in k.asm["ptx"]] for k in kernels)))
"""


def test_candidates_compile_in_parallel_without_launching(tmp_path):
    """The tuner compiles every candidate's kernels on CPU threads before timing them (Triton's
    AsyncCompileMode): here for an H100 on this CPU, through the launchers' compile_only path. Each candidate
    lands compiled in the kernel's cache, nothing is launched (there is no GPU), and a compile that fails does
    not stop the others (the candidate's own launch reports it later)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton cannot compile for NVIDIA GPUs")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: every kernel is compiled here
    perf = Path(__file__).resolve().parents[1] / "perf"
    done = subprocess.run([sys.executable, "-c", COMPILE_IN_PARALLEL, str(perf)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[4, True], [8, True], [8, True]]
