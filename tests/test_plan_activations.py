"""The planner's activation model against what autograd really keeps for the backward.

`megamath plan` sizes activations with a stated per-token model (megamath/planning/memory.py). Here the
model runs one forward in bf16 on the Triton kernels (the path a GPU run takes; Triton's interpreter on
CPU) under a saved-tensors hook that records every distinct storage kept for the backward, parameters
left out. What it keeps must be the planner's `activations` plus the saved logits, give or take the
small per-token vectors the model does not itemise (token ids, RMSNorm's and the loss's fp32 statistics):
within 1 %. Once serial, once as TP 2 with sequence parallelism on two gloo ranks (each rank's own bytes).
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.parallel.state import ParallelState
from megamath.planning.memory import RunShape, activation_bytes

CONFIG = ModelConfig(vocab_size=320, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=192,
                     max_seq_length=64, kernels="triton")
B, S = 2, 64


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


def predicted_bytes(tp: int, sp: bool) -> int:
    shape = RunShape(tp=tp, dp=1, micro_batch=B, grad_accum=1, seq_length=S, activation_checkpointing=False,
                     sequence_parallel=sp)
    logits_saved = B * S * CONFIG.vocab_size // tp * 2  # bf16; the planner's logits item adds their gradient
    return activation_bytes(CONFIG, shape)["activations"] + logits_saved


def _worker(rank, world_size, out_dir):
    state = ParallelState.from_env(2)
    torch.manual_seed(0)
    model = Llama(CONFIG, state, sequence_parallel=True).to(torch.bfloat16)
    torch.save(saved_bytes(model), out_dir / f"saved-{rank}.pt")


def test_serial_activations_are_what_autograd_keeps():
    torch.manual_seed(0)
    measured, predicted = saved_bytes(Llama(CONFIG).to(torch.bfloat16)), predicted_bytes(1, False)
    assert measured == pytest.approx(predicted, rel=0.01), (measured, predicted)


def test_tensor_and_sequence_parallel_activations_are_what_autograd_keeps(tmp_path):
    run_distributed(_worker, 2, tmp_path)
    predicted = predicted_bytes(2, True)
    for rank in range(2):
        measured = torch.load(tmp_path / f"saved-{rank}.pt")
        assert measured == pytest.approx(predicted, rel=0.01), (rank, measured, predicted)
