"""Safetensors checkpoint folders, Hugging Face's layout: read by name, written in shards, published atomically.

A folder holds `config.json` and either one `model.safetensors` or shards `model-0000i-of-0000N.safetensors`
listed by `model.safetensors.index.json`. Reading memory-maps the files and returns one tensor at a time;
writing streams tensors into one shard at a time, so a conversion needs about one shard of memory. Where
the shard boundaries fall is huggingface_hub's rule (the one transformers' `save_pretrained` uses); the
folder is built beside its destination and renamed into place, so no half-written folder is ever seen.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megamath.atomic_io import fsync_path, naming_write_errors, remove_dead_temporaries, temp_tag

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_TMP_PREFIX = ".megamath-tmp-"  # write_dir_atomically's temp folder inside an empty DST
# The weights a Llama can hold. Integer, bool and float8 tensors are refused, not cast: an int8 tensor cast to
# float is its quantized codes without their scales, i.e. garbage that converts and loads without complaint.
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing, unparsable or non-object file is one error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: neither names the file
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class SafetensorsReader:
    """Tensors of a checkpoint directory, by name, read one at a time from memory-mapped files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} not found")
        index, single = self.directory / INDEX_NAME, self.directory / WEIGHTS_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            for name, f in weight_map.items():  # a file name, not leading out of the checkpoint folder
                if not isinstance(f, str) or f in ("", ".", "..") or "\\" in f or Path(f).name != f:
                    raise ValueError(f"{index}: weight_map names {f!r}, not a file name inside {self.directory} "
                                     f"(for {name})")
            files = sorted(set(weight_map.values()))
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
            try:
                handle = self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            except SafetensorError as err:  # a truncated or foreign file: its header does not parse
                raise ValueError(f"{self.directory / file}: not a readable safetensors file ({err})") from None
            for name in handle.keys():
                self.file_of[name] = file
        if weight_map is not None:
            absent = sorted(n for n, f in weight_map.items() if self.file_of.get(n) != f)
            if absent:
                raise ValueError(f"{INDEX_NAME} lists tensors their files lack: {some_names(absent)}")

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensor as stored, or once cast to `dtype`."""
        numel = 1
        for n in self.shape(name):
            numel *= n
        return numel * (dtype or self.dtype(name)).itemsize

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype; anything but a float weight is refused, naming the file, tensor and dtype."""
        code = self._handles[self.file_of[name]].get_slice(name).get_dtype()
        if code not in _TORCH_DTYPES:
            raise ValueError(f"{self.directory / self.file_of[name]}: tensor {name} is stored as {code}; only "
                             f"{', '.join(_TORCH_DTYPES)} weights are read (dequantize the checkpoint first)")
        return _TORCH_DTYPES[code]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, cast to `dtype` if given (cast_checked: an overflow is an error)."""
        self.dtype(name)  # refuses a non-float tensor
        tensor = self._handles[self.file_of[name]].get_tensor(name)
        return tensor if dtype is None else cast_checked(tensor, dtype, name)


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`tensor.to(dtype)`, refused when the cast turns finite values into inf (bf16's 1e5 is fp16's inf).

    Why: `--dtype float16` on bf16 or fp32 weights beyond ±65504 wrote a model whose first forward is NaN,
    with exit status 0; the tensor is named so the user sees which weight does not fit."""
    out = tensor.to(dtype)
    if out.dtype == tensor.dtype or not out.is_floating_point() or torch.isfinite(out).all():
        return out
    lost = torch.isfinite(tensor) & ~torch.isfinite(out)
    if lost.any():
        top = tensor[lost].abs().max().item()
        raise ValueError(f"tensor {name}: casting {str(tensor.dtype).removeprefix('torch.')} to "
                         f"{str(dtype).removeprefix('torch.')} turns {int(lost.sum())} finite values into inf "
                         f"(largest {top:.6g}, the most {str(dtype).removeprefix('torch.')} holds is "
                         f"{torch.finfo(dtype).max:.6g}); keep the stored dtype or choose a wider one")
    return out


def some_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# ---- writing ----------------------------------------------------------------------------------------------

def parse_size(size: str | int) -> int:
    """'5GB' -> 5·10⁹ bytes, '2GiB' -> 2·2³⁰; an int is bytes already. (huggingface_hub's parser has no
    binary units and its errors do not name the flag, hence this one.)"""
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


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions any other file gets (0666 less the umask).

    Why: safetensors 0.8 writes through a private temporary file and keeps its mode, 0600, so an export or
    checkpoint on a shared file system was unreadable to everyone but its writer whatever their umask."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_safetensors_dir(directory: Path, plan: list[tuple[str, int]], fetch: Callable[[str], torch.Tensor],
                          max_shard_bytes: int) -> None:
    """Write the tensors of `plan` ((name, nbytes), in the model's order) into shards of at most
    max_shard_bytes, cut by huggingface_hub's rule; only the shard being written is held in memory."""
    split = split_state_dict_into_shards_factory(dict(plan), get_storage_size=lambda nbytes: nbytes,
                                                 get_storage_id=lambda nbytes: None,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_bytes)
    for file, names in split.filename_to_tensors.items():
        shard = {n: fetch(n).contiguous() for n in names}
        try:
            save_safetensors(shard, directory / file, metadata={"format": "pt"})
        except SafetensorError as err:  # a full disk, as safetensors words it ("I/O error: ..."): an OSError
            raise OSError(f"{file}: {' '.join(str(err).split())}") from err  # for write_dir_atomically to name
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_dir_atomically(dst: str | Path, write: Callable[[Path], None]) -> Path:
    """Build the checkpoint in a temp folder, fsync it, then publish it as DST; returns DST, resolved.

    DST is resolved first ('.' and a symlink name the folder they lead to) and checked before anything is
    written: it must not exist, or be an empty folder. A new DST is the temp folder beside it, renamed
    into place: no half-written DST is ever seen. An empty folder is kept and filled, the temp folder
    inside it, its entries moved up with config.json last: the folder may be the shell's current one, a
    mount point or a symlink's target, which a rename over it would detach or fail on at the very end;
    a reader finds no config.json until the rest is there. Every file and both folders are fsynced before
    and after publishing (atomic_io's rule), or a crash right after could leave a DST of empty shards.
    """
    dst = Path(dst).resolve()
    if dst.is_dir():
        remove_dead_temporaries(dst, _TMP_PREFIX)  # a killed convert's, inside the empty DST it was filling
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty directory")
    in_place = dst.is_dir()
    tmp = dst / f"{_TMP_PREFIX}{temp_tag()}" if in_place else dst.with_name(f".{dst.name}.tmp-{temp_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)  # a file in the way is named here, not as the temp folder
    if not in_place:
        remove_dead_temporaries(dst.parent, f".{dst.name}.tmp-")  # a killed export's: as large as the model
    tmp.mkdir()
    moved = []
    try:
        with naming_write_errors(dst, "nothing of it was kept"):  # a full disk, in whichever file it struck
            write(tmp)
            for path in tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_path(tmp)
        if in_place:
            for path in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):  # config.json last
                os.rename(path, dst / path.name)
                moved.append(dst / path.name)
            tmp.rmdir()
            fsync_path(dst)
        else:
            os.replace(tmp, dst)
            fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    return dst
