"""megamath's own model folders (a `Llama` as config.json + safetensors), and conversion to and from Hugging Face.

These are *model folders*: one model's weights, what `megamath convert` reads and writes and what
`init_from_hf` accepts. Training checkpoints (sharded per rank, with optimizer and RNG state) are
megamath.training.checkpoint's, a different thing with different names (`save_checkpoint` there,
`save_model_folder` here). The safetensors library is used directly (no transformers import).

Besides config.json (ModelConfig's fields, strictly) a model folder converted from Hugging Face keeps
what the architecture does not say but an export must give back: the special token ids of HF's config
(token_ids.json) and HF's generation_config.json, copied as is.

Dtypes: only float weights are read (safetensors_io refuses int, bool, float8). A folder whose weights
mix float dtypes (a bf16 embedding among fp32 layers), which no forward runs on, is cast to one dtype:
`dtype` if given, else the config's `dtype`/`torch_dtype` (what transformers' from_pretrained loads it
as), else the dtype of most parameters (by element count). Uniform weights keep their dtype unless
`dtype` says otherwise; every cast refuses to turn finite values into inf (safetensors_io.cast_checked).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from megamath.model.config import ModelConfig
from megamath.model.hf_llama import (IGNORED_HF_TENSORS, check_tensors, from_hf_name, hf_config_to_model_config,
                                     model_config_to_hf_config, to_hf_name, token_ids)
from megamath.model.llama import Llama
from megamath.model.partition import parameter_shapes
from megamath.model.safetensors_io import (CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, SafetensorsReader, cast_checked,
                                           parse_size, read_json, some_names, write_dir_atomically,
                                           write_safetensors_dir)


TOKEN_IDS_NAME = "token_ids.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}


def load_config(directory: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_json(Path(directory) / CONFIG_NAME))


def weights_dtype(reader: SafetensorsReader, files: dict[str, str], dtype: torch.dtype | None,
                  named: object = None) -> torch.dtype:
    """The one dtype the weights `files` (our name -> name in the files) are written or loaded in (see the
    module docstring); every weight's stored dtype is checked first, so a non-float one is refused early."""
    stored = {n: reader.dtype(f) for n, f in files.items()}
    if dtype is not None:
        return dtype
    kinds = set(stored.values())
    if len(kinds) == 1:
        return kinds.pop()
    if isinstance(named, str) and named in _NAMED_DTYPES:
        return _NAMED_DTYPES[named]
    numel = {kind: 0 for kind in kinds}
    for n, kind in stored.items():
        numel[kind] += math.prod(reader.shape(files[n]))
    return max(kinds, key=lambda kind: (numel[kind], kind.itemsize))


def hf_extras(directory: str | Path) -> tuple[dict, Path | None]:
    """(special token ids, generation_config.json or None) of a Hugging Face or megamath model folder."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_NAME)
    if "model_type" in config:
        ids = token_ids(config, str(directory / CONFIG_NAME))
    elif (directory / TOKEN_IDS_NAME).is_file():
        ids = token_ids(read_json(directory / TOKEN_IDS_NAME), str(directory / TOKEN_IDS_NAME))
    else:
        ids = {}
    generation = directory / GENERATION_CONFIG_NAME
    if not generation.is_file():
        return ids, None
    read_json(generation)  # a broken one is refused here, not by transformers when the export loads
    return ids, generation


def write_hf_extras(tmp: Path, ids: dict, generation: Path | dict | None, hf: bool) -> None:
    """Into an export's temp folder: the token ids (megamath folders only: an HF config.json holds them)
    and generation_config.json, copied from a file or written from its contents (a training checkpoint's
    record, hf_extras_record)."""
    if ids and not hf:
        (tmp / TOKEN_IDS_NAME).write_text(json.dumps(ids, indent=2) + "\n")
    if isinstance(generation, dict):
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
    elif generation is not None:
        shutil.copyfile(generation, tmp / GENERATION_CONFIG_NAME)


def hf_extras_record(directory: str | Path) -> dict:
    """What a training run started from `directory` keeps in its checkpoints' metadata (`hf_extras`), so that
    its export gives back the folder's special token ids and generation_config.json even once the folder is
    gone: {"token_ids": {...}, "generation_config": {...} or None}."""
    ids, generation = hf_extras(directory)
    return {"token_ids": ids, "generation_config": None if generation is None else read_json(generation)}


def read_hf_extras_record(record: object, where: str) -> tuple[dict, dict | None]:
    """(token ids, generation config) of a checkpoint's `hf_extras`, checked: a wrong type is one line."""
    if not isinstance(record, dict) or not isinstance(record.get("token_ids"), dict) \
            or not isinstance(record.get("generation_config"), (dict, type(None))):
        raise ValueError(f"{where}: hf_extras must map token_ids to a mapping and generation_config to a mapping "
                         f"or null, got {record!r}")
    return token_ids(record["token_ids"], where), record["generation_config"]


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
        write_safetensors_dir(tmp, plan, lambda n: cast_checked(state[n].cpu(), dtype or state[n].dtype, n),
                              max_bytes)

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
    dtype = weights_dtype(reader, {n: n for n in parameter_shapes(config)}, dtype)
    with torch.device("meta"):
        model = Llama(config)
    state = {n: reader.get(n, dtype).to(device) for n in parameter_shapes(config)}
    model.load_state_dict(state, assign=True)
    return model


def convert_hf_to_megamath(src: str | Path, dst: str | Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                           dtype: torch.dtype | None = None) -> ModelConfig:
    """Hugging Face Llama directory -> megamath checkpoint directory; returns the model's config."""
    src, max_bytes = Path(src), parse_size(max_shard_size)
    hf = read_json(src / CONFIG_NAME)
    config = hf_config_to_model_config(hf)
    ids, generation = hf_extras(src)
    reader = SafetensorsReader(src)
    hf_names = [n for n in reader.names() if not IGNORED_HF_TENSORS.match(n)]
    foreign = sorted(n for n in hf_names if to_hf_name(from_hf_name(n)) != n)  # not "model.*" / "lm_head.weight"
    if foreign:
        raise ValueError(f"checkpoint has unknown tensors: {some_names(foreign)}")
    hf_of = {from_hf_name(n): n for n in hf_names}  # our name -> HF name
    check_tensors({n: reader.shape(hf) for n, hf in hf_of.items()}, config, lambda n: hf_of.get(n, to_hf_name(n)))
    dtype = weights_dtype(reader, hf_of, dtype, hf.get("dtype") or hf.get("torch_dtype"))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_hf_extras(tmp, ids, generation, hf=False)
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
    dtype = weights_dtype(reader, {n: n for n in parameter_shapes(config)}, dtype)
    ids, generation = hf_extras(src)
    hf_config = model_config_to_hf_config(config, dtype, ids)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        write_hf_extras(tmp, ids, generation, hf=True)
        plan = [(to_hf_name(n), reader.nbytes(n, dtype)) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, lambda hf: reader.get(from_hf_name(hf), dtype), max_bytes)

    write_dir_atomically(dst, write)
    return config


@dataclass(frozen=True)
class Deferred:
    """A tensor made only when it is written (say, joined from memory-mapped rank files), so that a converter
    holds one tensor at a time, not the model."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def save_state_as_hf(state: dict[str, torch.Tensor | Deferred], config: ModelConfig, dst: str | Path,
                     dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                     ids: dict | None = None) -> Path:
    """Serial Llama tensors under megamath's names (another trainer's checkpoint, mapped; each a tensor or
    Deferred) -> a Hugging Face Llama folder, cast to `dtype` (default: the dtype most of the weights have);
    its config names the special token `ids` (token_ids' keys), by default Llama 2's bos 1 / eos 2."""
    max_bytes = parse_size(max_shard_size)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    check_tensors(shapes, config, str)
    if dtype is None:
        counts: dict[torch.dtype, int] = {}
        for name, tensor in state.items():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + math.prod(shapes[name])
        dtype = max(counts, key=counts.get)
    hf_config = model_config_to_hf_config(config, dtype, ids)
    by_hf = {to_hf_name(n): n for n in state}

    def fetch(hf: str) -> torch.Tensor:
        value = state[by_hf[hf]]
        tensor = value.read() if isinstance(value, Deferred) else value
        if tuple(tensor.shape) != shapes[by_hf[hf]]:  # a Deferred that made another shape than it promised
            raise ValueError(f"{hf}: made with shape {tuple(tensor.shape)}, expected {shapes[by_hf[hf]]}")
        return cast_checked(tensor.contiguous(), dtype, hf)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        plan = [(to_hf_name(n), math.prod(shapes[n]) * dtype.itemsize) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, fetch, max_bytes)

    return write_dir_atomically(dst, write)
