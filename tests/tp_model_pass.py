"""The serial model and one rank's tensor-parallel part of it, through one forward and backward each.

Shared by the TP model tests (tests/test_tensor_parallel.py, tests/test_tp_vocab_padding.py): both build the
two models from one seed, give the TP one the serial weights' slices and compare what each computed.
"""
from __future__ import annotations

import torch

from megamath.model import Llama, ModelConfig
from megamath.model.tp_state_dict import shard_state_dict
from megamath.parallel.layers import gather_vocab_logits
from megamath.parallel.sequence_parallel import allreduce_sequence_parallel_grads
from megamath.parallel.state import ParallelState


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def serial_and_tp_pass(config: ModelConfig, state: ParallelState, sequence_parallel: bool, tokens: torch.Tensor,
                       targets: torch.Tensor, serial_pass: bool = True) -> tuple[Llama, Llama, dict]:
    """(serial model, TP model, results): `init` (the TP model as its seeded init built it, before it is given
    the serial slices), `serial_state`, and for each model its logits, loss and gradients (`tp_logits` this
    rank's vocabulary slice, `tp_logits_gathered` all of it; `tp_grads_partial` before the sequence-parallel
    norm gradients are summed over TP, `tp_grads` after). With serial_pass=False the serial model is built (its
    weights are the TP model's) but not run: its pass is the same on every rank, one rank's will do."""
    torch.manual_seed(11)
    serial = Llama(config)
    torch.manual_seed(11)
    model = Llama(config, state, sequence_parallel=sequence_parallel)
    r = {"init": {k: v.clone() for k, v in model.state_dict().items()},
         "serial_state": {k: v.clone() for k, v in serial.state_dict().items()}}
    model.load_state_dict(shard_state_dict(serial.state_dict(), config, state.tp_size, state.tp_rank))
    if serial_pass:
        logits, loss = serial(tokens, targets)
        loss.backward()
        r.update(serial_logits=logits.detach(), serial_loss=loss.detach(), serial_grads=grads(serial))
    logits, loss = model(tokens, targets)
    loss.backward()
    r.update(tp_logits=logits.detach(), tp_loss=loss.detach(), tp_grads_partial=grads(model),
             tp_logits_gathered=gather_vocab_logits(logits.detach(), config.vocab_size, state.tp_group))
    allreduce_sequence_parallel_grads(model.sequence_parallel_parameters(), state)
    r["tp_grads"] = grads(model)
    return serial, model, r
