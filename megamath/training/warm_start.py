"""A run's first weights when `init_from_hf` names a megamath training run or checkpoint: weights only, step 0.

This is Megatron-LM's `--finetune` (its `--no-load-optim --no-load-rng`) for megamath's own checkpoints: a
second stage of continued pretraining (other data, a new schedule, fresh Adam moments) starts from the first
stage's weights. Exporting the checkpoint to a model folder first does the same in two commands; reading it
here takes its TP slices at any TP size, after checking the model files' checksums, and carries its record
of the special token ids and generation config (`hf_extras`) on to the new run's checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megamath.model.safetensors_io import cast_checked
from megamath.model.tp_state_dict import tp_slice
from megamath.parallel.state import ParallelState
from megamath.training.checkpoint import IncompleteCheckpointError, read_metadata
from megamath.training.reshard import TrainCheckpoint, resolve_checkpoint
from megamath.training.resume import SHAPE_KEYS

@torch.no_grad()
def load_training_weights(model: torch.nn.Module, path: str | Path, state: ParallelState) -> None:
    """Copy this TP rank's slices of the checkpoint at `path` (a run directory: its latest) into `model`.

    The model's shape must be the checkpoint's; everything else (rope_theta, norm_eps, max_seq_length, the
    kernels) is the run's own, as with a Hugging Face folder."""
    try:
        source = TrainCheckpoint(resolve_checkpoint(path), with_optimizer=False)
    except IncompleteCheckpointError as err:  # the fault, said of init_from_hf; the advice is a resume's
        raise ValueError(f"init_from_hf: {err.fault}") from None
    except (FileNotFoundError, ValueError) as err:  # its own words, said of init_from_hf
        raise type(err)(f"init_from_hf: {err}") from None
    differ = [f"{key} {getattr(source.config, key)} (checkpoint) vs {getattr(model.config, key)} (this run)"
              for key in SHAPE_KEYS if getattr(source.config, key) != getattr(model.config, key)]
    if differ:
        raise ValueError(f"init_from_hf: {source.path} holds a model of another shape than this run's: "
                         f"{'; '.join(differ)}")
    for name, param in model.named_parameters():
        full = source.weight(name)
        part = full if state.tp_size == 1 else tp_slice(full, name, model.config, state.tp_size, state.tp_rank)
        param.copy_(cast_checked(part, param.dtype, name))


def training_hf_extras(path: str | Path) -> dict | None:
    """The checkpoint's `hf_extras` record (None when its run had none), for the new run's checkpoints."""
    return read_metadata(resolve_checkpoint(path)).get("hf_extras")
