"""megamath's own model folders (a `Llama` as config.json + safetensors), and conversion to and from Hugging Face.

These are *model folders*: one model's weights, what `megamath convert` reads and writes and what
`init_from_hf` accepts. Training checkpoints (sharded per rank, with optimizer and RNG state) are
megamath.training.checkpoint's, a different thing with different names (`save_checkpoint` there,
`save_model_folder` here). The safetensors library is used directly (no transformers import).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megamath.model.config import ModelConfig
from megamath.model.hf_llama import (IGNORED_HF_TENSORS, check_tensors, from_hf_name, hf_config_to_model_config,
                                     model_config_to_hf_config, to_hf_name)
from megamath.model.llama import Llama
from megamath.model.partition import parameter_shapes
from megamath.model.safetensors_io import (CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, SafetensorsReader, parse_size,
                                           read_json, some_names, write_dir_atomically, write_safetensors_dir)


def load_config(directory: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_json(Path(directory) / CONFIG_NAME))


def save_model_folder(model, directory: str | Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a `Llama` as a megamath model folder (config.json + safetensors), optionally cast."""
    max_bytes = parse_size(max_shard_size)
    config: ModelConfig = model.config
    state = {n: t.detach() for n, t in model.state_dict().items()}
    check_tensors({n: tuple(t.shape) for n, t in state.items()}, config, str)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        plan = [(n, state[n].numel() * (dtype or state[n].dtype).itemsize) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, lambda n: state[n].to("cpu", dtype or state[n].dtype), max_bytes)

    return write_dir_atomically(directory, write)


def load_model_folder(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    **overrides):
    """Build the `Llama` of a megamath model folder; `overrides` replace config fields
    (e.g. kernels="reference"). The model is created on the meta device, so no time goes into a
    random initialization that the weights overwrite."""
    config = load_config(directory)
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    reader = SafetensorsReader(directory)
    check_tensors({n: reader.shape(n) for n in reader.names()}, config, str)
    with torch.device("meta"):
        model = Llama(config)
    state = {n: reader.get(n, dtype).to(device) for n in parameter_shapes(config)}
    model.load_state_dict(state, assign=True)
    return model


def convert_hf_to_megamath(src: str | Path, dst: str | Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                           dtype: torch.dtype | None = None) -> ModelConfig:
    """Hugging Face Llama directory -> megamath checkpoint directory; returns the model's config."""
    src, max_bytes = Path(src), parse_size(max_shard_size)
    config = hf_config_to_model_config(read_json(src / CONFIG_NAME))
    reader = SafetensorsReader(src)
    hf_names = [n for n in reader.names() if not IGNORED_HF_TENSORS.match(n)]
    foreign = sorted(n for n in hf_names if to_hf_name(from_hf_name(n)) != n)  # not "model.*" / "lm_head.weight"
    if foreign:
        raise ValueError(f"checkpoint has unknown tensors: {some_names(foreign)}")
    hf_of = {from_hf_name(n): n for n in hf_names}  # our name -> HF name
    check_tensors({n: reader.shape(hf) for n, hf in hf_of.items()}, config, lambda n: hf_of.get(n, to_hf_name(n)))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        plan = [(n, reader.nbytes(hf_of[n], dtype)) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, lambda n: reader.get(hf_of[n], dtype), max_bytes)

    write_dir_atomically(dst, write)
    return config


def convert_megamath_to_hf(src: str | Path, dst: str | Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                           dtype: torch.dtype | None = None) -> ModelConfig:
    """megamath checkpoint directory -> Hugging Face Llama directory (loads with LlamaForCausalLM)."""
    src, max_bytes = Path(src), parse_size(max_shard_size)
    config = load_config(src)
    reader = SafetensorsReader(src)
    check_tensors({n: reader.shape(n) for n in reader.names()}, config, str)
    hf_config = model_config_to_hf_config(config, dtype or reader.dtype("embed_tokens.weight"))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        plan = [(to_hf_name(n), reader.nbytes(n, dtype)) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, lambda hf: reader.get(from_hf_name(hf), dtype), max_bytes)

    write_dir_atomically(dst, write)
    return config
