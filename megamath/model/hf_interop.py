"""Checkpoints on disk: megamath's own directory format and Hugging Face Llama, both ways.

Both formats are a `config.json` plus safetensors weights, either one `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` listed by `model.safetensors.index.json` (Hugging Face's layout).
They differ in the config (HF's LlamaConfig keys vs our ModelConfig as a dict) and in the tensor names:
HF = "model." + ours, except `lm_head.weight`. Weights are already in the rotate-half RoPE layout on
both sides, so conversion is renaming only: no transposes, no q/k permutation, values bit-identical.

The safetensors library is used directly (no transformers import), and tensors stream from memory-
mapped input files into one output shard at a time, so converting needs about one shard of memory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.model.partition import parameter_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Old HF checkpoints stored RoPE's inverse frequencies; they are recomputed from θ, never loaded.
_IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- names and shapes ----------------------------------------------------------------------------------

def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def from_hf_name(hf_name: str) -> str:
    return hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix("model.")


# ---- configs -------------------------------------------------------------------------------------------

def hf_config_to_model_config(hf: dict) -> ModelConfig:
    """Map a Hugging Face LlamaConfig dict onto ModelConfig; refuse what this architecture cannot express."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"Hugging Face config: model_type must be 'llama', got {hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("Hugging Face config: tie_word_embeddings must be false "
                         "(megamath's Llama has an untied embedding and LM head)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Hugging Face config: hidden_act must be 'silu', got {hf['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(f"Hugging Face config: {key} must be false (megamath's Llama has no biases)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                           "num_hidden_layers") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face config: missing keys {', '.join(missing)}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"Hugging Face config: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ValueError(f"Hugging Face config: head_dim {hf['head_dim']} must equal hidden_size / "
                         f"num_attention_heads = {hf['hidden_size'] // heads}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"], max_seq_length=hf.get("max_position_embeddings", 2048),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02),
    )


def model_config_to_hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """A LlamaConfig dict that transformers 4.x and 5.x both load (top-level rope_theta, torch_dtype)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_length,
        "rope_theta": config.rope_theta, "rope_scaling": None, "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
    }


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        return json.load(f)


# ---- reading safetensors checkpoints ------------------------------------------------------------------

class SafetensorsReader:
    """Tensors of a checkpoint directory, by name, read one at a time from memory-mapped files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} not found")
        index, single = self.directory / INDEX_NAME, self.directory / WEIGHTS_NAME
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            outside = [f for f in files if not isinstance(f, str) or f in ("", ".", "..") or "\\" in f
                       or Path(f).name != f]
            if outside:  # a file name must not lead out of the checkpoint folder
                raise ValueError(f"{index}: weight_map names {outside[0]!r}, not a file name inside {self.directory}")
        elif single.is_file():
            weight_map, files = None, [WEIGHTS_NAME]
        else:
            other = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            hint = f" (found {', '.join(other)}: only safetensors checkpoints are read)" if other else ""
            raise FileNotFoundError(f"{self.directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found{hint}")
        self._handles = {}
        self.file_of: dict[str, str] = {}  # tensor name -> file name
        for file in files:
            if not (self.directory / file).is_file():
                raise FileNotFoundError(f"{self.directory / file} (listed in {INDEX_NAME}) not found")
            handle = self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            for name in handle.keys():
                self.file_of[name] = file
        if weight_map is not None:
            absent = sorted(n for n, f in weight_map.items() if self.file_of.get(n) != f)
            if absent:
                raise ValueError(f"{INDEX_NAME} lists tensors their files lack: {_some(absent)}")

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensor as stored, or once cast to `dtype`."""
        tensor_slice = self._handles[self.file_of[name]].get_slice(name)
        numel = 1
        for n in tensor_slice.get_shape():
            numel *= n
        width = _DTYPE_BYTES[tensor_slice.get_dtype()] if dtype is None else dtype.itemsize
        return numel * width

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self._handles[self.file_of[name]].get_slice(name).get_dtype()]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._handles[self.file_of[name]].get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_tensors(found: dict[str, tuple[int, ...]], config: ModelConfig, describe: Callable[[str], str]) -> None:
    """Names and shapes must be exactly the model's; errors name the offending tensors (in file naming)."""
    expected = parameter_shapes(config)
    missing = [describe(n) for n in expected if n not in found]
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {_some(missing)}")
    unknown = sorted(describe(n) for n in found if n not in expected)
    if unknown:
        raise ValueError(f"checkpoint has unknown tensors: {_some(unknown)}")
    wrong = [f"{describe(n)} {found[n]} (expected {expected[n]})" for n in expected if found[n] != expected[n]]
    if wrong:
        raise ValueError(f"checkpoint tensors have wrong shapes: {_some(wrong)}")


# ---- writing safetensors checkpoints ------------------------------------------------------------------

def parse_size(size: str | int) -> int:
    """'5GB' -> 5·10⁹ bytes, '2GiB' -> 2·2³⁰ (Hugging Face's units); an int is bytes already."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
        unit = (match.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        value = int(float(match.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {size!r}")
    return value


def write_safetensors_dir(directory: Path, plan: list[tuple[str, int]], fetch: Callable[[str], torch.Tensor],
                          max_shard_bytes: int) -> None:
    """Write tensors (name, nbytes) in plan order into shards of at most max_shard_bytes (a larger tensor
    gets a shard of its own); only the shard being written is held in memory."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in plan:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    count = len(shards)
    files = [WEIGHTS_NAME] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for file, names in zip(files, shards):
        save_file({n: fetch(n).contiguous() for n in names}, str(directory / file), metadata={"format": "pt"})
    if count > 1:
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes in plan)},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_dir(dst: str | Path, write: Callable[[Path], None]) -> Path:
    """Build the checkpoint in a sibling temp folder, then rename it into place: no half-written DST."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty directory")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst



# ---- megamath checkpoints -------------------------------------------------------------------------------

def load_config(directory: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(_read_json(Path(directory) / CONFIG_NAME))


def save_checkpoint(model, directory: str | Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a `Llama` as a megamath checkpoint directory (config.json + safetensors), optionally cast."""
    max_bytes = parse_size(max_shard_size)
    config: ModelConfig = model.config
    state = {n: t.detach() for n, t in model.state_dict().items()}
    check_tensors({n: tuple(t.shape) for n, t in state.items()}, config, str)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        plan = [(n, state[n].numel() * (dtype or state[n].dtype).itemsize) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, lambda n: state[n].to("cpu", dtype or state[n].dtype), max_bytes)

    return _write_dir(directory, write)


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    **overrides):
    """Build the `Llama` of a megamath checkpoint directory; `overrides` replace config fields
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


# ---- conversion ------------------------------------------------------------------------------------------

def convert_hf_to_megamath(src: str | Path, dst: str | Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                           dtype: torch.dtype | None = None) -> ModelConfig:
    """Hugging Face Llama directory -> megamath checkpoint directory; returns the model's config."""
    src, max_bytes = Path(src), parse_size(max_shard_size)
    config = hf_config_to_model_config(_read_json(src / CONFIG_NAME))
    reader = SafetensorsReader(src)
    hf_names = [n for n in reader.names() if not _IGNORED_HF_TENSORS.match(n)]
    foreign = sorted(n for n in hf_names if to_hf_name(from_hf_name(n)) != n)  # not "model.*" / "lm_head.weight"
    if foreign:
        raise ValueError(f"checkpoint has unknown tensors: {_some(foreign)}")
    hf_of = {from_hf_name(n): n for n in hf_names}  # our name -> HF name
    check_tensors({n: reader.shape(hf) for n, hf in hf_of.items()}, config, lambda n: hf_of.get(n, to_hf_name(n)))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        plan = [(n, reader.nbytes(hf_of[n], dtype)) for n in parameter_shapes(config)]
        write_safetensors_dir(tmp, plan, lambda n: reader.get(hf_of[n], dtype), max_bytes)

    _write_dir(dst, write)
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

    _write_dir(dst, write)
    return config
