"""Training checkpoints: save, find, load (on another DP size too), prune; and the pretrained initialization.

Layout of RUN_DIR/checkpoints/:

    step_0001000/
        metadata.json                 rank 0: step, consumed samples, tp/dp sizes, schedule, the run's config
        model_tp00.safetensors        the model's TP rank 0 slice, written by its DP rank 0 (bf16 when training in bf16)
        optimizer_tp00_dp000.pt       each rank's ZeRO-1 shard: fp32 master, exp_avg, exp_avg_sq, layout
        rng_rank00000.pt              each rank's python / numpy / torch / cuda RNG states
    latest                            the name of the newest complete checkpoint, one line

Atomicity: every rank writes into `.step_0001000.tmp/` and fsyncs its files; after a barrier rank 0
writes metadata.json (the mark of completeness), fsyncs, renames the folder into place, and only then
replaces `latest` (temp file + rename). A process killed at any point leaves `latest` naming a complete
checkpoint; the half-written temp folder is ignored and removed by the next save of that step.
All ranks must see one filesystem (a shared one across nodes).

Resume on another DP size works because every DP rank of the new run reads the optimizer shards of
all old DP ranks of its TP rank (memory-mapped, so only the slices it needs are read) and hands them to
`ZeroOptimizer.load_sharded_state_dicts`, which re-cuts them. A different TP size goes through
`megamath.training.reshard` (`megamath reshard`, or `load_checkpoint_any_tp` on resume).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megamath.atomic_io import fsync_path as _fsync  # module names: crash tests patch them here
from megamath.atomic_io import write_text_atomically as _write_text_atomically
from megamath.model.hf_interop import CONFIG_NAME, SafetensorsReader, check_tensors, to_hf_name
from megamath.model.partition import tp_partition_dim
from megamath.parallel.layers import shard_tensor
from megamath.parallel.state import ParallelState

FORMAT = "megamath-train-checkpoint-v1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
METADATA = "metadata.json"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def model_file(tp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}.safetensors"


def optimizer_file(tp_rank: int, dp_rank: int) -> str:
    return f"optimizer_tp{tp_rank:02d}_dp{dp_rank:03d}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def checkpoint_files(tp_size: int, dp_size: int) -> list[str]:
    """Every file a complete checkpoint of this layout holds besides metadata.json."""
    files = [model_file(t) for t in range(tp_size)]
    files += [optimizer_file(t, d) for d in range(dp_size) for t in range(tp_size)]
    return files + [rng_file(r) for r in range(tp_size * dp_size)]


# ---- durability helpers ------------------------------------------------------------------------------------

def _barrier(state: ParallelState) -> None:
    if state.is_distributed:
        dist.barrier()


# ---- RNG states -------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process' RNG states in torch.load(weights_only=True)-safe types."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss,
                                                              cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save ---------------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, state: ParallelState,
                    metadata: dict, keep: int) -> Path:
    """Write step `step`'s checkpoint (collective: every rank calls it) and prune to the newest `keep`."""
    root = Path(run_dir) / CHECKPOINTS
    name = step_dir_name(step)
    final, tmp = root / name, root / f".{name}.tmp"
    if state.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        tmp.mkdir(parents=True)
    _barrier(state)
    if state.dp_rank == 0:
        # Clones: the parameters are views of one flat buffer, which safetensors refuses to save as is.
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in model.state_dict().items()}
        _save(lambda path: save_file(tensors, str(path)), tmp / model_file(state.tp_rank))
    _save(lambda path: torch.save(optimizer.sharded_state_dict(), path), tmp / optimizer_file(state.tp_rank,
                                                                                               state.dp_rank))
    _save(lambda path: torch.save(rng_state(), path), tmp / rng_file(state.rank))
    _barrier(state)  # every shard is on disk
    if state.rank == 0:
        meta = {"format": FORMAT, "step": step, "tp_size": state.tp_size, "dp_size": state.dp_size,
                "world_size": state.world_size, "files": checkpoint_files(state.tp_size, state.dp_size), **metadata}
        _save(lambda path: path.write_text(json.dumps(meta, indent=2) + "\n"), tmp / METADATA)
        _fsync(tmp)
        if final.exists():  # this step was saved before, by a run that went on past it and was resumed earlier
            old = root / f".{name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(root)
        _write_text_atomically(root / LATEST, name + "\n")
        prune_checkpoints(root, keep)
    _barrier(state)
    return final


def _save(write, path: Path) -> None:
    write(path)
    _fsync(path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under `root`, oldest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / METADATA).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints; never the one `latest` names."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for _, path in complete_checkpoints(root)[:-keep]:
        if path.name != latest:
            shutil.rmtree(path)


# ---- find and load -------------------------------------------------------------------------------------------

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / METADATA).is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint; point it at one of "
                         f"{[p.name for _, p in complete_checkpoints(root)]} or resume from a path")
    return path


def read_metadata(path: str | Path) -> dict:
    """A checkpoint's metadata, after checking that every file it lists is there."""
    path = Path(path)
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {METADATA} not found")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    missing = [f for f in meta["files"] if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is missing files: {', '.join(missing)}")
    return meta


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, state: ParallelState) -> dict:
    """Restore model, optimizer (re-cut when the DP size changed) and, on an unchanged layout, RNG states."""
    path = Path(path)
    meta = read_metadata(path)
    if meta["tp_size"] != state.tp_size:
        raise ValueError(f"checkpoint {path} was saved with tensor-parallel size {meta['tp_size']}, this run uses "
                         f"{state.tp_size}: re-cut it with `megamath reshard` or load it with "
                         f"megamath.training.reshard.load_checkpoint_any_tp")
    with torch.no_grad():
        model.load_state_dict(load_file(str(path / model_file(state.tp_rank))), strict=True)
    shards = [torch.load(path / optimizer_file(state.tp_rank, d), map_location="cpu", mmap=True, weights_only=True)
              for d in range(meta["dp_size"])]
    optimizer.load_sharded_state_dicts(shards)
    if meta["dp_size"] == state.dp_size:
        set_rng_state(torch.load(path / rng_file(state.rank), weights_only=True))
    return meta


# ---- initialization from a pretrained checkpoint ---------------------------------------------------------------

def load_pretrained(model: torch.nn.Module, directory: str | Path, state: ParallelState) -> None:
    """Copy a Hugging Face Llama (or megamath) checkpoint's weights into `model`, this TP rank's slices only.

    Tensors stream one at a time from memory-mapped safetensors, so a rank needs about one full tensor
    of extra memory. The checkpoint's shapes must be the model config's; other settings (rope_theta,
    max_seq_length) are the run's own: LLEMMA 7B started from Code Llama's weights with θ = 1e4.
    """
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"init_from_hf: {directory / CONFIG_NAME} not found")
    is_hf = "model_type" in json.loads((directory / CONFIG_NAME).read_text())
    file_name = to_hf_name if is_hf else (lambda n: n)
    reader = SafetensorsReader(directory)
    ours = {(n.removeprefix("model.") if is_hf and n != "lm_head.weight" else n): n for n in reader.names()
            if not n.endswith("rotary_emb.inv_freq")}
    check_tensors({n: reader.shape(f) for n, f in ours.items()}, model.config, file_name)
    tp = state.tp_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = reader.get(ours[name])
            dim = tp_partition_dim(name, model.config, tp)
            piece = full if tp == 1 or dim is None else shard_tensor(full, dim, tp, state.tp_rank, name)
            param.copy_(piece)
