"""Export a training checkpoint (a run directory's latest, or one step folder, at any TP size) as a
Hugging Face Llama folder: `megamath convert megamath-to-hf RUN_DIR hf-out`.

Training writes per-TP-rank slices with a metadata.json, not the config.json + safetensors of a
megamath model folder, so the export merges each parameter's slices (reshard.TrainCheckpoint, after
checking the model files' checksums) and streams them, one output shard at a time, into the Hugging
Face layout that model_folder.py writes. The optimizer state is not read.

A run started from a model folder (`init_from_hf`) records that folder's special token ids and
generation_config.json in its checkpoints' metadata (`hf_extras`), and the export writes them back. A
checkpoint saved before that record gets them from the folder itself, if it is still there with the run's
vocabulary size; a run with neither exports Llama 2's bos 1 / eos 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megamath.model.config import ModelConfig
from megamath.model.hf_llama import from_hf_name, model_config_to_hf_config, to_hf_name
from megamath.model.partition import parameter_shapes
from megamath.model.model_folder import hf_extras, read_hf_extras_record, write_hf_extras
from megamath.model.safetensors_io import (CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, cast_checked, parse_size, read_json,
                                           write_dir_atomically, write_safetensors_dir)
from megamath.training.checkpoint import CHECKPOINTS, LATEST, METADATA
from megamath.training.reshard import TrainCheckpoint, resolve_checkpoint


def is_training_checkpoint(path: str | Path) -> bool:
    """A step folder, a run directory or its checkpoints/ folder (as opposed to a megamath model folder)."""
    path = Path(path)
    return ((path / METADATA).is_file() or (path / CHECKPOINTS / LATEST).is_file()
            or (path.name == CHECKPOINTS and (path / LATEST).is_file()))


def export_training_checkpoint_to_hf(src: str | Path, dst: str | Path,
                                     max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                                     dtype: torch.dtype | None = None) -> ModelConfig:
    """Merged serial weights of a training checkpoint -> a Hugging Face Llama folder; returns the model config."""
    max_bytes = parse_size(max_shard_size)
    step = resolve_checkpoint(src)
    if step is None or not (step / METADATA).is_file():
        raise FileNotFoundError(f"{src}: no training checkpoint found (no {METADATA}, no {CHECKPOINTS}/{LATEST})")
    source = TrainCheckpoint(step, with_optimizer=False)
    config = source.config
    names = list(parameter_shapes(config))
    stored = source.weight(names[0]).dtype  # training keeps every parameter in one dtype
    dtype = dtype or stored
    if "hf_extras" in source.meta:
        ids, generation = read_hf_extras_record(source.meta["hf_extras"], f"{step / METADATA}")
    else:
        ids, generation = init_extras(source.meta["config"].get("init_from_hf"), config)
    hf_config = model_config_to_hf_config(config, dtype, ids)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        write_hf_extras(tmp, ids, generation, hf=True)
        plan = [(to_hf_name(n), _numel(shape) * dtype.itemsize) for n, shape in parameter_shapes(config).items()]
        write_safetensors_dir(tmp, plan, lambda hf: cast_checked(source.weight(from_hf_name(hf)), dtype, hf), max_bytes)

    write_dir_atomically(dst, write)
    return config


def init_extras(init_from: str | None, config: ModelConfig) -> tuple[dict, Path | None]:
    """For a checkpoint without `hf_extras`: the token ids and generation_config.json of the folder the run started from, when it is still
    there and holds a model of the run's vocabulary (ids of another tokenizer would be wrong, not missing)."""
    if not init_from or not (Path(init_from) / CONFIG_NAME).is_file():
        return {}, None
    saved = read_json(Path(init_from) / CONFIG_NAME)
    if saved.get("vocab_size") != config.vocab_size:
        return {}, None
    return hf_extras(init_from)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
