"""The model's mean loss over fixed held-out samples: every eval_every steps, after the last step (the test sets),
and alone, for the run's starting point (`skip_train`, Megatron-LM's --skip-train).

Why the starting point: continued pretraining asks first where it starts, the validation and test losses of
init_from_hf's weights (or of the checkpoint a resume would take) on the run's own held-out sets, with the
samples the run evaluates later, so that the curve has its point before step 1. That evaluation trains nothing
and writes nothing of the run but RUN_DIR/held_out_step{N}.json (and attention.json, as any start of the run
does): metrics.jsonl, config.yaml and the checkpoints stay as they were.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megamath.atomic_io import write_text_atomically
from megamath.evaluation.during_training import evaluate_tasks
from megamath.model.llama import Llama
from megamath.parallel.mappings import all_reduce_
from megamath.parallel.state import ParallelState
from megamath.training.data import TrainData
from megamath.training.metrics import finite_or_none


def mean_over_dp(value: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The mean of a scalar over the DP group (TP ranks of a DP rank hold the same loss), on the device."""
    if state.dp_group is not None:
        value = value.clone()
        all_reduce_(value, state.dp_group)
        value /= state.dp_size
    return value


@torch.no_grad()
def evaluate(model: Llama, data: TrainData, state: ParallelState, sets: dict | None = None) -> dict[str, float]:
    """Mean loss of each held-out set (data.valid's by default, or data.test's) over its fixed samples (all DP
    ranks' share)."""
    model.eval()
    losses = {}
    for name, dataset in (data.valid if sets is None else sets).items():
        batches = data.held_out_batches(dataset)
        total = torch.zeros((), dtype=torch.float32, device=state.device)
        for tokens, targets in batches:
            total += model(tokens, targets)[1].float()
        losses[name] = float(mean_over_dp(total / len(batches), state))
    model.train()
    return losses


def evaluate_start(model: Llama, data: TrainData, config, state: ParallelState, step: int, source: str) -> dict:
    """skip_train: the held-out losses (and evaluation.tasks' accuracies) of the model as the run would start
    from `source` at `step`; rank 0 prints them and writes RUN_DIR/held_out_step{step}.json. Collective."""
    say = print if state.rank == 0 else (lambda line: None)
    record: dict = {"step": step, "source": source}
    for key, sets in (("val_loss", data.valid), ("test_loss", data.test)):
        if sets:
            record[key] = {name: finite_or_none(value) for name, value in evaluate(model, data, state, sets).items()}
    record.update(evaluate_tasks(model, config.evaluation, state, say))
    if state.rank != 0:
        return record
    path = Path(config.run_dir) / f"held_out_step{step:07d}.json"
    write_text_atomically(path, json.dumps(record, indent=1) + "\n")
    say(f"skip_train: the held-out losses of {source} at step {step} (nothing trained):")
    for key, short in (("val_loss", "val"), ("test_loss", "test")):
        for name, loss in record.get(key, {}).items():
            ppl = f"perplexity {math.exp(loss):.4g}" if loss is not None and loss < 700 else "perplexity -"
            say(f"  {f'{short}/{name}':<28} loss {loss if loss is None else f'{loss:.4f}'}  {ppl}")
    for name, value in record.items():
        if name.startswith("eval/"):
            say(f"  {name:<28} {value:.2%}")
    say(f"written to {path}")
    return record
