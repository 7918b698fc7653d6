"""Training checkpoints: save, find, load (on another DP size too), prune.

(Initialising from pretrained weights is megamath.model.pretrained; model folders are model_folder.py.)

Layout of RUN_DIR/checkpoints/:

    step_0001000/
        metadata.json                 rank 0: step, consumed samples, tp/dp sizes, schedule, the run's config,
                                      update_ok, every other file's size and SHA-256 (`checksums`), and
                                      the SHA-256 of its own contents (`metadata_sha256`)
        model_tp00.safetensors        the model's TP rank 0 slice, written by its DP rank 0 (bf16 when training in bf16)
        optimizer_tp00_dp000.pt       each rank's ZeRO-1 shard: fp32 master, exp_avg, exp_avg_sq, layout
        rng_rank00000.pt              each rank's python / numpy / torch / cuda RNG states
    latest                            the name of the newest complete checkpoint, one line

Atomicity: every rank writes into `.step_0001000.tmp-ATTEMPT/` (unique per run attempt) and fsyncs its
files; after a barrier rank 0 writes metadata.json (the mark of completeness, with every file's size and
SHA-256, see checkpoint_integrity.py), fsyncs, renames the folder into place, and only then replaces
`latest` (temp file + rename). A process killed at any point leaves `latest` naming a complete
checkpoint; the half-written temp folder is ignored and removed by the next run (under its run lock), and so
is a pruned checkpoint half-deleted (renamed to a temporary name before its delete).
Loading checks each file against its recorded checksum first. All ranks must see one filesystem.

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
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from megamath.atomic_io import fsync_path as _fsync  # module names: crash tests patch them here
from megamath.atomic_io import free_space as _free_space
from megamath.atomic_io import write_text_atomically as _write_text_atomically
from megamath.model.safetensors_io import save_safetensors
from megamath.parallel.mappings import barrier
from megamath.parallel.state import ParallelState
from megamath.training.checkpoint_integrity import (CheckpointIntegrityError, check_file_name, check_metadata_seal,
                                                    collect_sums, sealed_metadata_text, verify_files,
                                                    write_rank_sums)

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
    barrier(state.world_group)


# ---- RNG states -------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process' RNG states in torch.load(weights_only=True)-safe types."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss,
                                                              cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This rank's device only: a resume on nodes with fewer GPUs (same DP size) sees fewer devices.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # saved by older megamath: every visible device's state, by index
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# ---- save ---------------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, state: ParallelState,
                    metadata: dict, keep: int, attempt: str = "0") -> Path:
    """Write step `step`'s checkpoint (collective: every rank calls it) and prune to the newest `keep`.

    `attempt` makes the temporary folder unique to this run attempt (the same string on every rank)."""
    root = Path(run_dir) / CHECKPOINTS
    name = step_dir_name(step)
    final, tmp = root / name, root / f".{name}.tmp-{attempt}"
    if state.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save of this attempt that failed
        tmp.mkdir(parents=True)
    _barrier(state)
    written = []
    if state.dp_rank == 0:
        # Clones: the parameters are views of one flat buffer, which safetensors refuses to save as is.
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in model.state_dict().items()}
        write_checkpoint_file(lambda path: save_safetensors(tensors, path), tmp / model_file(state.tp_rank))
        written.append(model_file(state.tp_rank))
    write_checkpoint_file(lambda path: torch.save(optimizer.sharded_state_dict(), path),
                          tmp / optimizer_file(state.tp_rank, state.dp_rank))
    write_checkpoint_file(lambda path: torch.save(rng_state(), path), tmp / rng_file(state.rank))
    written += [optimizer_file(state.tp_rank, state.dp_rank), rng_file(state.rank)]
    write_rank_sums(tmp, state.rank, written)
    _barrier(state)  # every shard is on disk
    if state.rank == 0:
        files = checkpoint_files(state.tp_size, state.dp_size)
        sums = collect_sums(tmp)
        missing = [f for f in files if f not in sums]
        if missing:
            raise CheckpointIntegrityError(f"saving {tmp}: no rank reported {', '.join(missing)}")
        meta = {"format": FORMAT, "step": step, "tp_size": state.tp_size, "dp_size": state.dp_size,
                "world_size": state.world_size, "files": files, **metadata,
                "checksums": {f: sums[f] for f in files}}
        write_metadata(tmp, meta)
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


def write_checkpoint_file(write, path: Path) -> None:
    """`write(path)`, then fsync; any failure (a full disk above all) becomes one OSError naming the file."""
    try:
        write(path)
        _fsync(path)
    except Exception as err:
        # A full disk reaches us as torch.save's "unexpected pos 93184 vs 93072" (a RuntimeError) or safetensors'
        # SafetensorError, neither naming the file: say which file, how much room is left, and what survives.
        raise OSError(f"could not write checkpoint file {path} ({_free_space(path.parent)} free there): "
                      f"{' '.join(str(err).split())}; the checkpoints saved before are untouched") from err


def write_metadata(folder: Path, meta: dict) -> None:
    """Write (and fsync) `folder`'s metadata.json, sealed with the digest of its contents."""
    write_checkpoint_file(lambda path: path.write_text(sealed_metadata_text(meta)), folder / METADATA)


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
    """Delete all but the newest `keep` complete checkpoints up to the one `latest` names (which is kept);
    never the newest of those saved right after a successful update (`update_ok` in its metadata): the last
    good state.

    Checkpoints newer than `latest` are a future the run rewound past (it resumed from an earlier one: a
    path, or `latest` pointed back by hand to step past a loss spike). They are neither counted nor
    deleted here, so that they never push out the checkpoints the run continues from; its saves replace
    them as it reaches their steps."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    found = complete_checkpoints(root)
    head = next((step for step, path in found if path.name == latest), None)
    if head is not None:
        found = [(step, path) for step, path in found if step <= head]
    protected = {latest}
    for _, path in reversed(found):
        if _saved_after_good_update(path):
            protected.add(path.name)
            break
    for _, path in found[:-keep]:
        if path.name not in protected:
            # Renamed first: a kill during the (long) delete leaves a temporary that the next run removes,
            # not a step folder whose metadata.json went first, which nothing would ever count or delete.
            doomed = root / f".{path.name}.old-{os.getpid()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed)


def _saved_after_good_update(path: Path) -> bool:
    try:
        meta = json.loads((path / METADATA).read_text())
        if not isinstance(meta, dict):
            return False
        check_metadata_seal(meta, str(path / METADATA))
    except (OSError, ValueError):  # unreadable or altered metadata vouches for nothing
        return False
    return bool(meta.get("update_ok", meta.get("consecutive_nonfinite", 1) == 0))


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification to `step_….corrupt` (never deleted: kept to inspect)."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
    os.rename(path, target)
    _fsync(path.parent)
    return target


def check_writable(root: Path) -> None:
    """Fail at the start, not at the first save hours in, when checkpoints cannot be written under `root`.

    A file is created and removed there (permission bits, ACLs and read-only mounts all answer that);
    it is named like a save's temporary, so a kill between the two leaves it to remove_stale_temporaries.
    A folder not made yet is made by the first save in RUN_DIR, which the run lock's file proved writable.
    """
    if not os.path.lexists(root):
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".step_probe.tmp-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"cannot write checkpoints in {root} ({err.strerror or err}): the run would lose its steps at "
                      "its first save; make the folder writable or choose another run_dir") from err


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove the temporary folders of saves that died (call only while holding the run lock)."""
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".step_") and (".tmp" in entry.name or ".old-" in entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


# ---- find and load -------------------------------------------------------------------------------------------

class IncompleteCheckpointError(ValueError):
    """`latest` names a step folder that is not a complete checkpoint. The fault and the advice are kept
    apart: the advice fits a resume, while init_from_hf reading the same run says only the fault."""

    def __init__(self, fault: str, advice: str):
        super().__init__(f"{fault}; {advice}")
        self.fault, self.advice = fault, advice


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    named = pointer.read_text().strip()
    if not _STEP_DIR.match(named):  # a pointer may only name a step folder beside it
        raise ValueError(f"{pointer} holds {named[:80]!r}, not the name of a step_NNNNNNN folder beside it")
    path = root / named
    if not (path / METADATA).is_file():
        raise IncompleteCheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint",
                                        f"point it at one of {[p.name for _, p in complete_checkpoints(root)]} "
                                        "or resume from a path")
    return path


def read_metadata(path: str | Path, check_files: bool = True) -> dict:
    """A checkpoint's metadata, after checking that every file it lists is there."""
    path = Path(path)
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {METADATA} not found")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointIntegrityError(f"{meta_path} is not valid JSON ({err})") from None
    if isinstance(meta, dict):
        check_metadata_seal(meta, str(meta_path))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} checkpoint (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if not isinstance(meta.get("files"), list):
        raise CheckpointIntegrityError(f"{meta_path} lists no files")
    _check_metadata_types(meta, meta_path)
    # A step folder copied or renamed by hand (or unsealed metadata) must not resume at another step.
    named = _STEP_DIR.match(path.name)
    if named and meta.get("step") != int(named.group(1)):
        raise CheckpointIntegrityError(f"{meta_path} says step {meta.get('step')!r}, but its folder is {path.name}")
    for name in meta["files"]:
        check_file_name(name, str(meta_path))
    if not check_files:
        return meta
    missing = [f for f in meta["files"] if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is missing files: {', '.join(missing)}")
    return meta


def _check_metadata_types(meta: dict, meta_path: Path) -> None:
    """The fields readers index into have the types they expect (metadata saved before the seal, or by a
    buggy writer, may not): a wrong type is a one-line integrity error, not a TypeError deep in a reader."""
    for key, low in (("step", 0), ("tp_size", 1), ("dp_size", 1), ("world_size", 1)):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CheckpointIntegrityError(f"{meta_path}: {key} must be an integer >= {low}, got {value!r}")
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointIntegrityError(f"{meta_path}: config must be a mapping with a model mapping, got "
                                       f"{type(config).__name__}")
    sums = meta.get("checksums")
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(s, dict) and isinstance(s.get("bytes"), int) and isinstance(s.get("sha256"), str)
            for s in sums.values())):
        raise CheckpointIntegrityError(f"{meta_path}: checksums must map each file to its bytes and sha256")


def files_read(meta: dict, state: ParallelState) -> list[str]:
    """The files of a checkpoint that this rank reads on load (every model and optimizer file on another
    TP size, since each parameter is then rebuilt from all slices)."""
    if meta["tp_size"] != state.tp_size:
        return [f for f in meta["files"] if not f.startswith("rng_")]
    files = [model_file(state.tp_rank)] + [optimizer_file(state.tp_rank, d) for d in range(meta["dp_size"])]
    return files + ([rng_file(state.rank)] if meta["dp_size"] == state.dp_size else [])


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, state: ParallelState,
                    verify: bool = True) -> dict:
    """Restore model, optimizer (re-cut when the DP size changed) and, on an unchanged layout, RNG states.

    With `verify`, every file this rank reads is checked against its recorded size and SHA-256 first
    (CheckpointIntegrityError naming the file otherwise); `verify=False` when the caller just did."""
    path = Path(path)
    meta = read_metadata(path)
    if meta["tp_size"] != state.tp_size:
        raise ValueError(f"checkpoint {path} was saved with tensor-parallel size {meta['tp_size']}, this run uses "
                         f"{state.tp_size}: re-cut it with `megamath reshard` or load it with "
                         f"megamath.training.reshard.load_checkpoint_any_tp")
    if verify:
        verify_files(path, meta, files_read(meta, state))
    with torch.no_grad():
        model.load_state_dict(load_file(str(path / model_file(state.tp_rank))), strict=True)
    shards = [torch.load(path / optimizer_file(state.tp_rank, d), map_location="cpu", mmap=True, weights_only=True)
              for d in range(meta["dp_size"])]
    optimizer.load_sharded_state_dicts(shards)
    if meta["dp_size"] == state.dp_size:
        set_rng_state(torch.load(path / rng_file(state.rank), weights_only=True))
    return meta
