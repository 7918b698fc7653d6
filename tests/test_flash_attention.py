"""flash_attention against flash_attention_ref: forward, dq/dk/dv, the saved logsumexp, strided views,
and the errors for shapes the kernel cannot take.

Under the CPU interpreter the kernels use 16-wide tiles, so seq 17 and 129 end mid-block on both the
query and the key side, and seq 129 crosses several causal diagonals. The cases cover each axis
(dtype, batch, seq, kv_heads, head_dim, causal, scale) without the full product, which the interpreter
could not run in reasonable time.
"""
from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from kernel_tolerance import assert_close_3way

from megamath.kernels.flash_attention import (
    FlashAttentionBlocks,
    check_inputs,
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
    flash_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = importlib.import_module("megamath.kernels.flash_attention")  # the module, not the op it exports

# (batch, seq, heads, kv_heads, head_dim, causal, dtype, softmax_scale)
CASES = [
    (1, 129, 4, 4, 64, True, torch.float32, None),
    (1, 129, 4, 2, 64, False, torch.float32, 0.2),
    (3, 17, 4, 1, 64, True, torch.float32, None),
    (1, 129, 4, 2, 64, True, torch.bfloat16, None),
    (3, 17, 4, 2, 64, False, torch.bfloat16, None),
    (3, 1, 4, 2, 64, True, torch.bfloat16, None),
    (1, 17, 4, 1, 128, True, torch.bfloat16, 0.3),
    (1, 129, 4, 1, 64, True, torch.float16, None),
    (3, 17, 4, 4, 64, False, torch.float16, None),
    (1, 1, 4, 4, 64, False, torch.float16, 0.5),
]


def _inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen)  # (B, S, H, D)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen)  # (B, S, H_kv, D)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen)  # (B, S, H_kv, D)
    do = torch.randn(batch, seq, heads, head_dim, generator=gen)  # (B, S, H, D)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def _run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn on leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,causal,dtype,scale", CASES)
def test_forward_backward_match_reference(batch, seq, heads, kv_heads, head_dim, causal, dtype, scale):
    q, k, v, do = _inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=seq * 7 + kv_heads + head_dim)
    kw = dict(causal=causal, softmax_scale=scale)
    out = _run(flash_attention, q, k, v, do, **kw)
    ref32 = _run(flash_attention_ref, q.float(), k.float(), v.float(), do.float(), **kw)
    ref_lowp = _run(flash_attention_ref, q, k, v, do, **kw)
    assert out[0].shape == (batch, seq, heads, head_dim) and out[0].dtype == dtype
    assert out[2].shape == k.shape and out[3].shape == v.shape
    for name, got, r32, rlow in zip(("out", "dq", "dk", "dv"), out, ref32, ref_lowp):
        assert_close_3way(got, r32, rlow, name=f"{name} {dtype} causal={causal}")


def test_gqa_equals_attention_with_repeated_kv_heads():
    """A kv head shared by two q heads gets the sum of both heads' gradients (exact in fp32 up to
    summation order), the same as running full multi-head attention on repeated K/V."""
    q, k, v, do = _inputs(2, 33, 4, 2, 32, torch.float32, seed=3)
    _, _, dk, dv = _run(flash_attention, q, k, v, do)
    k_rep, v_rep = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # (B, S, H, D)
    _, _, dk_rep, dv_rep = _run(flash_attention, q, k_rep, v_rep, do)
    torch.testing.assert_close(dk, dk_rep.view(2, 33, 2, 2, 32).sum(3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv_rep.view(2, 33, 2, 2, 32).sum(3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_saved_logsumexp_is_the_row_logsumexp(causal):
    q, k, v, _ = _inputs(2, 40, 2, 1, 16, torch.float32, seed=11)
    _, lse = flash_attention_fwd(q, k, v, causal, 0.25)
    scores = torch.einsum("bshd,bthd->bhst", q, k.expand(-1, -1, 2, -1)) * 0.25  # (B, H, S, S)
    if causal:
        scores = scores.masked_fill(torch.ones(40, 40, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    assert lse.shape == (2, 2, 40) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_strided_views_of_a_fused_projection():
    """q, k, v sliced out of one (B, S, H + 2·H_kv, D) tensor are used in place, gradients included."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 21, 8, 32, generator=gen).to(DEVICE, torch.bfloat16)  # (B, S, 4 + 2 + 2, D)
    do = torch.randn(2, 21, 4, 32, generator=gen).to(DEVICE, torch.bfloat16)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    assert not q.is_contiguous()
    out = _run(flash_attention, q, k, v, do)
    dense = _run(flash_attention, q.contiguous(), k.contiguous(), v.contiguous(), do)
    for got, want in zip(out, dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sequence_major_views_keep_their_memory_order():
    """(B, S, H, D) views of sequence-first (S, B, H, D) memory, as the model passes them under sequence
    parallelism: the same values as dense inputs, and o, dq, dk, dv come back sequence-major too, so the
    model's transpose back to (S, B, ·) is a view, not a copy."""
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(21, 2, 8, 32, generator=gen).to(DEVICE, torch.bfloat16)  # (S, B, 4 + 2 + 2, D)
    do = torch.randn(21, 2, 4, 32, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)  # (B, S, 4, D)
    q, k, v = (t.transpose(0, 1) for t in (qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]))  # (B, S, ·, D) views
    out = _run(flash_attention, q, k, v, do)
    dense = _run(flash_attention, q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous())
    for got, want in zip(out, dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for t in out:  # o, dq, dk, dv
        assert t.transpose(0, 1).is_contiguous(), t.stride()
    assert dense[0].is_contiguous(), "batch-first inputs keep batch-first outputs"


@pytest.mark.parametrize("sequence_first", [False, True])
def test_gradients_of_one_projections_slices_are_slices_of_one_tensor(sequence_first):
    """k, v, q as the head slices of one projection output (in that order; ZeRO's is v, k, q): dq, dk, dv are
    slices of one new tensor in the same places, so the projection's backward takes it as its gradient
    without a concatenating copy; their values are those of separate dense inputs."""
    gen = torch.Generator().manual_seed(7)
    shape = (21, 2, 8, 32) if sequence_first else (2, 21, 8, 32)
    kvq = torch.randn(shape, generator=gen).to(DEVICE, torch.bfloat16)
    view = (lambda t: t.transpose(0, 1)) if sequence_first else (lambda t: t)
    k, v, q = (view(t) for t in (kvq[:, :, :2], kvq[:, :, 2:4], kvq[:, :, 4:]))  # (B, S, ·, D) views
    do = torch.randn(q.shape, generator=gen).to(DEVICE, torch.bfloat16)
    o, lse = flash_attention_fwd(q, k, v, True, 32 ** -0.5)
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, True, 32 ** -0.5)
    assert dq.untyped_storage().data_ptr() == dk.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr()
    assert [t.storage_offset() - dk.storage_offset() for t in (dv, dq)] == [2 * 32, 4 * 32]
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()
    dense = flash_attention_bwd(do, q.contiguous(), k.contiguous(), v.contiguous(), o, lse, True, 32 ** -0.5)
    for got, want in zip((dq, dk, dv), dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_positions_2_31_elements_apart_are_copied_not_read_at_wrapped_offsets():
    """Batch element 0 of sequence-major (S 3, B 2^26, H 1, D 16) tensors: positions lie B·H·D = 2^30
    elements apart, so the third one is 2^31 past the first, beyond the kernels' int32 position offsets.
    Such views are copied (before, the offset wrapped: a crash or another tensor's memory read as q)."""
    try:  # 4 GiB of address space; only the few rows written below are ever touched
        big = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve 4 GiB of address space here: {e}")
    q, k, v, do = (big.as_strided((1, 3, 1, 16), (16, 2**30, 16, 1), offset) for offset in (0, 16, 32, 48))
    for view, values in zip((q, k, v, do), _inputs(1, 3, 1, 1, 16, torch.float16, seed=12)):
        view.copy_(values)
    dense = [t.contiguous() for t in (q, k, v, do)]
    for causal in (True, False):
        o, lse = flash_attention_fwd(q, k, v, causal, 0.25)
        o_dense, lse_dense = flash_attention_fwd(*dense[:3], causal, 0.25)
        assert torch.equal(o, o_dense) and torch.equal(lse, lse_dense)
        grads = flash_attention_bwd(do, q, k, v, o, lse, causal, 0.25)
        for got, want in zip(grads, flash_attention_bwd(dense[3], *dense[:3], o, lse, causal, 0.25)):
            assert torch.equal(got, want)


def test_more_than_2_31_elements_per_batch_element_refused():
    """Even a batch-major copy could not be indexed in int32 then (shapes only: meta tensors)."""
    q = torch.empty(1, 2**21 + 1, 64, 16, device="meta")  # seq · heads · head_dim = 2^31 + 1024
    with pytest.raises(ValueError, match=r"^flash_attention: one batch element of q holds seq \* heads \* head_dim "
                                         r"= 2147484672 elements; the kernels support at most 2\^31$"):
        flash_attention(q, q, q)
    check_inputs(*(torch.empty(1, 2**21, 64, 16, device="meta"),) * 3)  # exactly 2^31 is fine


def test_launch_grids_keep_batch_times_heads_within_cuda_limit(monkeypatch):
    """batch x heads programs sit on the grid's second axis, which CUDA caps at 65535 (a launch beyond it
    fails): batch 4097 with 16 heads is launched in batch chunks. Grids recorded, kernels not run (meta)."""
    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.setdefault(self.name, []).append(grid)

    for name in ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(KERNELS, name, Recorder(name))
    q = torch.empty(4097, 1, 16, 16, device="meta")  # (B, S, H, D)
    kv = torch.empty(4097, 1, 4, 16, device="meta")
    for blocks in (None, FlashAttentionBlocks(16, 16, 4, 1, 16, 16, 16, 16, 4, 1, True)):
        o, lse = flash_attention_fwd(q, kv, kv, True, 0.25, blocks)
        flash_attention_bwd(q, q, kv, kv, o, lse, True, 0.25, blocks)
    heads = {"_fwd_kernel": 16, "_bwd_preprocess_kernel": 16, "_bwd_dkdv_kernel": 4, "_bwd_dq_kernel": 16}
    for name, launched in grids.items():
        assert max(grid[1] for grid in launched) <= 65535, name
        assert sum(grid[1] for grid in launched) == 4097 * heads[name] * (2 if name != "_bwd_dq_kernel" else 1)


@pytest.mark.parametrize("atomic_dq", [False, True])
def test_launches_split_over_batch_give_the_same_results(monkeypatch, atomic_dq):
    """With the grid limit lowered to 5, batch 3 x heads 4 runs as three launches of one batch element
    each, bit for bit what one launch gives."""
    blocks = FlashAttentionBlocks(16, 16, 4, 1, 16, 16, 16, 16, 4, 1, atomic_dq)
    q, k, v, do = _inputs(3, 17, 4, 2, 16, torch.float32, seed=13)

    def run():
        o, lse = flash_attention_fwd(q, k, v, True, 0.25, blocks)
        return (o, lse, *flash_attention_bwd(do, q, k, v, o, lse, True, 0.25, blocks))

    whole = run()
    monkeypatch.setattr(KERNELS, "_MAX_GRID_Y", 5)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), run(), whole):
        if atomic_dq and name == "dq":  # atomic adds: the order of additions varies
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want), name


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = _inputs(1, 9, 2, 2, 32, torch.float32, seed=2)
    torch.testing.assert_close(flash_attention(q, k, v, causal=False),
                               flash_attention(q, k, v, causal=False, softmax_scale=1 / math.sqrt(32)),
                               rtol=0, atol=0)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


BAD = [
    ((_t(2, 8, 4, 16), _t(2, 8, 4, 16, 1), _t(2, 8, 4, 16, 1)),
     "flash_attention: q, k and v must be 4-D (batch, seq, heads, head_dim); got shapes "
     "(2, 8, 4, 16), (2, 8, 4, 16, 1), (2, 8, 4, 16, 1)"),
    ((_t(2, 8, 4, 16), _t(2, 8, 2, 16), _t(2, 8, 1, 16)),
     "flash_attention: k and v must have the same shape; got (2, 8, 2, 16) and (2, 8, 1, 16)"),
    ((_t(2, 8, 4, 16), _t(2, 8, 4, 16, dtype=torch.float16), _t(2, 8, 4, 16)),
     "flash_attention: q, k and v must share one dtype among float16, bfloat16 and float32; got "
     "torch.float32, torch.float16, torch.float32"),
    ((_t(2, 8, 4, 16), _t(3, 8, 4, 16), _t(3, 8, 4, 16)),
     "flash_attention: q has batch 2 but k and v have batch 3"),
    ((_t(2, 8, 4, 16), _t(2, 9, 4, 16), _t(2, 9, 4, 16)),
     "flash_attention: q has seq 8 but k and v have seq 9"),
    ((_t(2, 8, 4, 16), _t(2, 8, 4, 32), _t(2, 8, 4, 32)),
     "flash_attention: q has head_dim 16 but k and v have head_dim 32"),
    ((_t(2, 8, 4, 16), _t(2, 8, 3, 16), _t(2, 8, 3, 16)),
     "flash_attention: heads (4) must be a multiple of kv_heads (3)"),
    ((_t(2, 8, 4, 48), _t(2, 8, 4, 48), _t(2, 8, 4, 48)),
     "flash_attention: head_dim 48 is not supported; use one of (16, 32, 64, 128)"),
    ((_t(2, 8, 4, 256), _t(2, 8, 4, 256), _t(2, 8, 4, 256)),
     "flash_attention: head_dim 256 is not supported; use one of (16, 32, 64, 128)"),
    ((_t(2, 0, 4, 16), _t(2, 0, 4, 16), _t(2, 0, 4, 16)),
     "flash_attention: batch and seq must be at least 1; got shape (2, 0, 4, 16)"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_raise_clear_errors(args, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        flash_attention(*args)


@pytest.mark.parametrize("causal", [True, False])
def test_unequal_tiles_match_reference(causal):
    """Query tiles twice the key tiles (forward, dQ) and the reverse (dK/dV), as on a GPU, so the
    split between whole blocks and masked diagonal blocks is exercised where it is not trivial."""
    blocks = FlashAttentionBlocks(32, 16, 4, 1, 16, 32, 32, 16, 4, 1)
    q, k, v, do = _inputs(1, 77, 4, 2, 32, torch.float32, seed=8)
    o, lse = flash_attention_fwd(q, k, v, causal, 0.25, blocks)
    grads = flash_attention_bwd(do, q, k, v, o, lse, causal, 0.25, blocks)
    ref = _run(flash_attention_ref, q, k, v, do, causal=causal, softmax_scale=0.25)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (o, *grads), ref):
        assert_close_3way(got, want, want, name=f"{name} causal={causal}")
