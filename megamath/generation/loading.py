"""Build a model for inference from whatever a user points at: a training run, one of its checkpoints, a
megamath checkpoint directory or a Hugging Face Llama folder; whole or as this TP rank's part.

The readers are the project's own (training.reshard.TrainCheckpoint merges a training checkpoint's TP
slices by name; model.pretrained.load_pretrained copies an HF / megamath directory's slices), so
inference reads every format training writes. The model is built on the meta device and materialized
empty: no time goes into a random initialization the weights overwrite.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megamath.model.config import ModelConfig
from megamath.model.hf_llama import hf_config_to_model_config
from megamath.model.llama import Llama
from megamath.model.pretrained import foreign_trainer, load_pretrained
from megamath.model.safetensors_io import CONFIG_NAME, cast_checked, read_json
from megamath.model.tp_state_dict import tp_slice
from megamath.parallel.state import ParallelState
from megamath.training.checkpoint import CHECKPOINTS, LATEST, METADATA


def checkpoint_kind(path: str | Path) -> str:
    """"train-run", "train-step", "hf" or "megamath" for a folder; FileNotFoundError otherwise."""
    path = Path(path)
    if (path / CHECKPOINTS / LATEST).is_file():
        return "train-run"
    if (path / METADATA).is_file():
        return "train-step"
    if (path / CONFIG_NAME).is_file():
        return "hf" if "model_type" in read_json(path / CONFIG_NAME) else "megamath"
    trainer = foreign_trainer(path)
    if trainer:
        raise ValueError(f"{path} is a {trainer[0]} checkpoint: convert it with `megamath convert {trainer[1]} "
                         f"{path} HF_DIR` and use HF_DIR")
    raise FileNotFoundError(f"{path}: not a training run (checkpoints/latest), a checkpoint step folder "
                            f"(metadata.json) or a model folder ({CONFIG_NAME})")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def load_model(path: str | Path, parallel: ParallelState | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, kernels: str = "auto") -> Llama:
    """The model at `path` in eval mode, this TP rank's slices under `parallel` (no sequence parallelism)."""
    parallel = parallel or ParallelState.single()
    device = torch.device(device) if device is not None else parallel.device
    kind = checkpoint_kind(path)
    source = None
    if kind in ("train-run", "train-step"):
        from megamath.training.reshard import TrainCheckpoint, resolve_checkpoint

        source = TrainCheckpoint(resolve_checkpoint(path))
        config = source.config
    elif kind == "hf":
        config = hf_config_to_model_config(read_json(Path(path) / CONFIG_NAME))
    else:
        config = ModelConfig.from_dict(read_json(Path(path) / CONFIG_NAME))
    config = dataclasses.replace(config, kernels=kernels, activation_checkpointing=False)
    with torch.device("meta"):
        model = Llama(config, parallel)
    model.to_empty(device=device).to(dtype or default_dtype(device))  # the weights are cast as they are copied
    if source is None:
        load_pretrained(model, path, parallel)
    else:
        for name, param in model.named_parameters():  # cast_checked: a weight the dtype cannot hold is refused
            param.copy_(cast_checked(tp_slice(source.weight(name), name, config, parallel.tp_size, parallel.tp_rank),
                                     param.dtype, name))
    return model.eval()
