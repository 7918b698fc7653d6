"""Tensor parallelism over a vocabulary the TP size does not divide (a pretrained 32,001 at TP 2) is exact.

Rank r holds ceil(V/p) rows of embed_tokens and lm_head: the serial rows partition.vocab_range(V, p, r),
then zero padding (last rank(s) only). The padding is never looked up and never multiplied into a logit,
so the model computes what TP 1 computes. Checked here against the serial model, as tests/test_tensor_parallel.py
does for an even split: V 63 at TP 2 (one padding row) and V 61 at TP 4 (three on rank 3), with sequence
parallelism on and off, the reference ops and the Triton kernels (interpreted on CPU): logits (each rank's
slice and gathered), loss, gradients (the padding's exactly zero), and one AdamW step with weight decay
(the padding and its moments stay exactly zero). One launch of 4 ranks. Without processes: the rule itself, the state-dict
round trip, and the refusal of a TP size that would leave a rank nothing but padding.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megamath.model import Llama, ModelConfig
from megamath.model.partition import local_shapes, vocab_range, vocab_rows_per_rank, vocab_tp_sizes
from megamath.model.tp_state_dict import merge_state_dicts, shard_state_dict
from megamath.parallel.layers import merge_shards, shard_tensor
from megamath.parallel.state import ParallelState
from tp_model_pass import serial_and_tp_pass

TOL = dict(rtol=1e-5, atol=1e-6)
BASE = dict(vocab_size=63, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
            max_seq_length=32, kernels="reference")
# name: (tp, config overrides, sequence_parallel)
CASES = {
    "tp2-v63": (2, dict(), False),
    "tp2-v63-sp": (2, dict(), True),
    "tp2-v63-triton-sp": (2, dict(kernels="triton", hidden_size=64), True),  # head_dim 16 for the kernel
    "tp4-v61": (4, dict(vocab_size=61), False),
    "tp4-v61-sp-checkpointed": (4, dict(vocab_size=61, activation_checkpointing=True), True),
    "tp4-v61-triton": (4, dict(vocab_size=61, kernels="triton", hidden_size=64), False),
}
VOCAB = ("embed_tokens.weight", "lm_head.weight")
B, S = 2, 8


def config_of(case: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[case][1]})


def batch(vocab: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, S + 1), generator=g)
    tokens[0, :3] = vocab - 1  # the last id (on the padded rank) is looked up and is a target
    targets = tokens[:, 1:].clone()
    targets[:, :1] = -100
    return tokens[:, :-1], targets


# ---- workers ---------------------------------------------------------------------------------------------

def _worker(rank, world_size, out_dir):
    results = {}
    for case, (tp, _, sp) in CASES.items():
        state = ParallelState.from_env(tp)
        if state.dp_rank == 0:  # the TP group of ranks 0, 1 (TP 2) or all four (TP 4)
            results[case] = _model_case(state, case, sp)
    torch.save(results, out_dir / f"rank{rank}.pt")


def _model_case(state, case: str, sp: bool) -> dict:
    config = config_of(case)
    tokens, targets = batch(config.vocab_size)
    first = state.tp_rank == 0  # the serial pass and step (one seed: the same on every rank) run on TP rank 0 only
    serial, model, r = serial_and_tp_pass(config, state, sp, tokens, targets, serial_pass=first)  # (init: the
    # seeded TP model's own; serial_state: the serial weights every rank builds and gives its TP model)
    r["ranges"] = (model.embed_tokens.vocab_start, model.embed_tokens.vocab_stop, model.lm_head.vocab_start,
                   model.lm_head.vocab_stop)
    for m in (serial, model) if first else (model,):  # a step with weight decay: the padding stays zero, moments too
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        opt.step()
        if m is model:
            r["tp_after"] = {n: p.detach().clone() for n, p in m.named_parameters()}
            r["tp_moments"] = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                               for n, p in m.named_parameters() if n in VOCAB}
        else:
            r["serial_after"] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return r


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp_vocab")
    run_distributed(_worker, 4, out_dir)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(4)]


# ---- the model against the serial one ----------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_padded_vocabulary_model_matches_serial(ranks, case):
    tp, _, _ = CASES[case]
    config = config_of(case)
    v, rows = config.vocab_size, vocab_rows_per_rank(config.vocab_size, tp)
    assert rows * tp > v, "the case must pad"
    serial = ranks[0][case]  # the serial model's pass, logits, gradients and step (TP rank 0 ran them)
    for rank in range(tp):
        r, where = ranks[rank][case], f"{case} rank {rank}"
        start, stop = vocab_range(v, tp, rank)
        assert r["ranges"] == (start, stop, start, stop)
        expected_init = shard_state_dict(r["serial_state"], config, tp, rank)
        for name, tensor in r["init"].items():
            assert torch.equal(tensor, expected_init[name]), f"{where}: init of {name}"
        for name in VOCAB:
            assert r["init"][name].shape[0] == rows
            assert not r["init"][name][stop - start:].any(), f"{where}: {name} padding is zero"
        # the padded logits never exist: this rank's slice is its valid ids only
        assert r["tp_logits"].shape == (B, S, stop - start)
        torch.testing.assert_close(r["tp_logits"], serial["serial_logits"][..., start:stop], **TOL)
        assert r["tp_logits_gathered"].shape == (B, S, v)
        torch.testing.assert_close(r["tp_logits_gathered"], serial["serial_logits"], **TOL)
        torch.testing.assert_close(r["tp_loss"], serial["serial_loss"], **TOL)
        expected = shard_state_dict(serial["serial_grads"], config, tp, rank)
        for name, grad in r["tp_grads"].items():
            torch.testing.assert_close(grad, expected[name], **TOL, msg=lambda m: f"{where}: grad of {name}: {m}")
        for name in VOCAB:
            assert not r["tp_grads"][name][stop - start:].any(), f"{where}: {name} padding gradient is exactly 0"
            assert not r["tp_after"][name][stop - start:].any(), f"{where}: {name} padding after a step"
            for moment in r["tp_moments"][name]:
                assert not moment[stop - start:].any(), f"{where}: {name} padding's Adam moments"
    # Adam's first step is about lr · sign(g), so it is not compared elementwise here (a gradient of 1e-9 may
    # differ in sign); tests/test_tp_vocab_training.py compares whole runs. The merge strips the padding.
    merged = merge_state_dicts([ranks[t][case]["tp_after"] for t in range(tp)], config)
    for name, tensor in merged.items():  # the serial tensors come back at the true V
        assert tensor.shape == serial["serial_after"][name].shape, name


# ---- without processes -----------------------------------------------------------------------------------

def test_vocab_rule():
    """ceil(V/p) rows per rank; the ranges tile [0, V) in order; padding only at the end; an even split as before."""
    for v in range(1, 70):
        for p in range(1, 9):
            rows = vocab_rows_per_rank(v, p)
            assert rows == -(-v // p)
            ranges = [vocab_range(v, p, r) for r in range(p)]
            assert ranges[0][0] == 0 and ranges[-1][1] == v
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(stop - start == rows for start, stop in ranges[:-1] if stop < v)
            if v % p == 0:
                assert ranges == [(r * v // p, (r + 1) * v // p) for r in range(p)]
            assert (p in vocab_tp_sizes(v)) == all(stop > start for start, stop in ranges)
    assert vocab_range(32001, 2, 1) == (16001, 32001)
    assert vocab_rows_per_rank(32001, 2) == 16001


@pytest.mark.parametrize("vocab, tp", [(63, 2), (61, 4), (62, 4), (64, 4)])
def test_padded_shard_merge_round_trip_is_bit_exact(vocab, tp):
    config = ModelConfig(**{**BASE, "vocab_size": vocab})
    torch.manual_seed(0)
    full = Llama(config).state_dict()
    shards = [shard_state_dict(full, config, tp, r) for r in range(tp)]
    rows = vocab_rows_per_rank(vocab, tp)
    assert local_shapes(config, tp)["lm_head.weight"] == (rows, 32)
    for rank, shard in enumerate(shards):
        start, stop = vocab_range(vocab, tp, rank)
        for name in VOCAB:
            assert shard[name].shape == (rows, 32)
            assert torch.equal(shard[name][:stop - start], full[name][start:stop])
            assert not shard[name][stop - start:].any()
    merged = merge_state_dicts(shards, config)
    assert list(merged) == list(full)
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name


def test_merge_refuses_nonzero_padding():
    config = ModelConfig(**BASE)
    full = Llama(config).state_dict()
    shards = [shard_state_dict(full, config, 2, r) for r in range(2)]
    shards[1]["lm_head.weight"][-1, 3] = 0.5  # what Megatron's loader would train: a row past V
    with pytest.raises(ValueError) as err:
        merge_state_dicts(shards, config)
    assert str(err.value) == ("lm_head.weight: TP rank 1's vocabulary padding (rows 31..31 of 2 ranks' split of 63) "
                              "is not zero")
    t = torch.arange(10.0).view(5, 2)
    assert torch.equal(merge_shards([shard_tensor(t, 0, 4, r, padded=True) for r in range(4)], 0, size=5), t)
    with pytest.raises(ValueError, match="dim 0 is not divisible"):  # only the vocabulary is padded
        shard_tensor(t, 0, 2, 0, "w")


def test_refuses_a_rank_of_padding_only():
    fake = ParallelState(world_size=4, rank=0, tp_size=4, tp_rank=0, dp_size=1, dp_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError) as err:
        Llama(ModelConfig(**{**BASE, "vocab_size": 6}), fake)
    assert str(err.value) == ("tensor-parallel size 4 would leave TP rank 3 no vocabulary id of vocab_size 6 (2 rows "
                              "per rank): use a TP size at which every rank owns some (1, 2, 3, 6)")


def test_loss_takes_a_vocabulary_start_only_with_its_size_and_a_group():
    from megamath.kernels.cross_entropy import cross_entropy
    from megamath.parallel.cross_entropy import vocab_parallel_cross_entropy_ref

    logits, targets = torch.randn(4, 6), torch.tensor([0, 5, -100, 3])
    for call in (lambda: cross_entropy(logits, targets, vocab_start=0, vocab_size=6),
                 lambda: cross_entropy(logits, targets, vocab_start=0),
                 lambda: vocab_parallel_cross_entropy_ref(logits, targets, vocab_size=6)):
        with pytest.raises(ValueError, match="vocab_start and vocab_size go together"):
            call()
    # one rank owning the whole vocabulary from 0: the serial loss
    torch.testing.assert_close(vocab_parallel_cross_entropy_ref(logits, targets, vocab_start=0, vocab_size=6),
                               vocab_parallel_cross_entropy_ref(logits, targets))
