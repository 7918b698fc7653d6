"""The planner's activation model against what autograd really keeps for the backward.

`megamath plan` sizes activations with a stated per-token model (megamath/planning/memory.py). Here the model
runs one forward in bf16 on the Triton kernels (the path a GPU run takes; Triton's interpreter on CPU) under a
saved-tensors hook that records every distinct storage kept for the backward, parameters left out. What it
keeps must be the planner's `activations` plus the saved logits (at TP 1 also their gradient, which the loss
kernel writes in the forward), give or take the small per-token vectors the model does not itemise (token ids,
RMSNorm's and the loss's fp32 statistics): within 1 %. Once serial, once as TP 2 with sequence parallelism on
two gloo ranks (each rank's own bytes), and once with K/V heads TP does not divide (each rank keeps only the
heads its query heads read). The first two also with the weights in ZeRO-1's buffer, as training runs them:
q/k/v and gate/up are then one matmul each, whose output the backward keeps whole (RoPE rotates q and k in
place there, so nothing more).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distributed import run_distributed
from megamath.model.config import ModelConfig
from megamath.model.llama import Attention, Llama
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.planning import memory
from megamath.planning.memory import RunShape, activation_bytes

CONFIG = ModelConfig(vocab_size=320, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=192,
                     max_seq_length=32, kernels="triton")
B, S = 2, 32


def saved_bytes(model: Llama) -> int:
    """Bytes of the distinct storages one training forward keeps for the backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, CONFIG.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1], tokens[:, 1:])
    return sum(storages.values())


LOSS_STATS = B * S * 8
"""The cross-entropy kernel's fp32 row max and log-sum per token (the planner's logits item counts them)."""


def predicted_bytes(tp: int, sp: bool) -> int:
    shape = RunShape(tp=tp, dp=1, micro_batch=B, grad_accum=1, seq_length=S, activation_checkpointing=False,
                     sequence_parallel=sp)
    logits_saved = B * S * CONFIG.vocab_size // tp * 2  # bf16; the planner's logits item adds their gradient
    # At TP 1 the loss kernel writes that gradient in the forward (the model names the loss's gradient), so it
    # is kept from the forward on; the planner's logits item counts it either way.
    gradient_saved = logits_saved if tp == 1 else 0
    return activation_bytes(CONFIG, shape)["activations"] + logits_saved + gradient_saved + LOSS_STATS


def _worker(rank, world_size, out_dir):
    """Both TP 2 + SP models of this file (CONFIG, then UNEVEN) in one launch: one process start per rank
    for the two tests; each from_env call builds its own groups."""
    for name, config in (("even", CONFIG), ("uneven", UNEVEN), ("even-zero", CONFIG)):
        state = ParallelState.from_env(2)
        torch.manual_seed(0)
        model = Llama(config, state, sequence_parallel=True).to(torch.bfloat16)
        if name.endswith("zero"):
            ZeroOptimizer(model, state, OptimizerConfig(), model.split_parameter_names())
        torch.save(saved_bytes(model), out_dir / f"saved-{name}-{rank}.pt")


@pytest.fixture(scope="module")
def tp2_saved(tmp_path_factory):
    """{(name, rank): bytes kept for the backward} of the two TP 2 + SP models."""
    out_dir = tmp_path_factory.mktemp("plan_activations")
    run_distributed(_worker, 2, out_dir)
    return {(name, rank): torch.load(out_dir / f"saved-{name}-{rank}.pt")
            for name in ("even", "uneven", "even-zero") for rank in range(2)}


@pytest.mark.parametrize("zero", [False, True], ids=["plain", "zero"])
def test_serial_activations_are_what_autograd_keeps(zero):
    torch.manual_seed(0)
    model = Llama(CONFIG).to(torch.bfloat16)
    if zero:
        ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
    measured, predicted = saved_bytes(model), predicted_bytes(1, False)
    assert measured == pytest.approx(predicted, rel=0.01), (measured, predicted)


@pytest.mark.parametrize("name", ["even", "even-zero"])
def test_tensor_and_sequence_parallel_activations_are_what_autograd_keeps(tp2_saved, name):
    predicted = predicted_bytes(2, True)
    for rank in range(2):
        measured = tp2_saved[(name, rank)]
        assert measured == pytest.approx(predicted, rel=0.01), (rank, measured, predicted)


# ---- K/V heads that TP does not divide -------------------------------------------------------------------

UNEVEN = ModelConfig(vocab_size=320, hidden_size=192, num_layers=1, num_heads=12, num_kv_heads=3, ffn_hidden_size=192,
                     max_seq_length=32, kernels="triton")
"""12 query heads over 3 K/V heads at TP 2: rank 0's six query heads read K/V heads 0,0,0,0,1,1, which do not
group evenly, so each rank keeps its k and v expanded to six heads (more than the 3 a whole copy holds)."""


def test_replicated_kv_activations_are_what_autograd_keeps(tp2_saved):
    """TP 2 with SP (one layer, to stay quick); the head count rule below covers every other layout."""
    shape = RunShape(tp=2, dp=1, micro_batch=B, grad_accum=1, seq_length=S, activation_checkpointing=False,
                     sequence_parallel=True)
    predicted = (activation_bytes(UNEVEN, shape)["activations"] + B * S * UNEVEN.vocab_size // 2 * 2  # + bf16 logits
                 + LOSS_STATS)
    for rank in range(2):
        measured = tp2_saved[("uneven", rank)]
        assert measured == pytest.approx(predicted, rel=0.01), (rank, measured, predicted)


@pytest.mark.parametrize("heads, kv_heads, tp", [(4, 2, 4), (12, 3, 2), (6, 3, 2), (8, 1, 2), (40, 10, 4), (16, 2, 8)])
def test_planned_kv_heads_follow_the_attention_layers_rule(heads, kv_heads, tp):
    """The planner's count of kept K/V heads is the busiest rank's under llama.Attention's own rule."""
    config = ModelConfig(vocab_size=64, hidden_size=heads * 8, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                         ffn_hidden_size=16, max_seq_length=8)
    kept = []
    for rank in range(tp):
        plan = SimpleNamespace(head_dim=config.head_dim, kv_expand=None)
        Attention._plan_replicated_kv(plan, config, rank, tp)
        kept.append(len(plan.kv_expand) if plan.kv_expand is not None
                    else (plan.kv_rows.stop - plan.kv_rows.start) // config.head_dim)
    assert memory._replicated_kv_heads(config, tp) == max(kept)
