"""Change a training checkpoint's tensor-parallel size (and its data-parallel size): `megamath reshard`.

Why: a checkpoint holds one model file per TP rank and one ZeRO-1 optimizer shard per (TP, DP) rank
(checkpoint.py). A new DP size is re-cut at load time (zero.py), but a new TP size moves slices of every
weight and of every Adam moment between files, so it is done here: offline into a new checkpoint
(`reshard_checkpoint`, Megatron's checkpoint-conversion tool), or while resuming (`load_checkpoint_any_tp`).

How, one parameter at a time, by name (p = old TP size, n = new, `tp_partition_dim` says the dim):

    weight          model_tp00 … model_tp{p-1}: concatenate the slices along the dim -> the serial tensor;
                    replicated tensors (norms, KV heads that do not split): one copy, equal on every rank;
                    a vocabulary p does not divide: each rank's zero padding rows checked and stripped
    master, exp_avg, exp_avg_sq
                    each old TP rank's flat fp32 vectors, cut over its DP ranks: the parameter's range is
                    read back by name and offset, viewed as the rank's slice, merged like the weight
    then            the serial tensor's slice for new TP rank t (shard_tensor; padded with zero rows for a
                    vocabulary n does not divide, so Adam moments of padding are zero too), placed where
                    ZeroOptimizer would put it (zero_layout: the run's buckets) in the new DP shards

Files are memory-mapped and read one parameter at a time: peak memory is one output file plus one
parameter's serial state (4 + 12 bytes per element), not the model. Every step is bit-exact (slicing and
concatenation only).

What the new checkpoint holds besides the tensors: metadata.json is the old one with the new tp_size,
dp_size, world_size and file list, the stored run config's parallel.tp_size set to n (sequence
parallelism off at n = 1), and `resharded_from` (the source's path and sizes); step, consumed samples,
schedule and the optimizer's step count are unchanged. RNG states: new rank r takes the saved states of
old rank r when r is below the old world size, so a job that keeps its size (TP 2 × DP 1 -> TP 1 × DP 2)
continues every process' streams; a rank the old job did not have starts the streams a fresh run seeds
for it (seed + rank, as training.loop.seed_rngs), so no two ranks share a stream. Nothing draws random
numbers after the initialization today; dropout would.
"""
from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from megamath.atomic_io import fsync_path, write_text_atomically
from megamath.model.config import ModelConfig
from megamath.model.partition import check_tensor_parallel, local_shapes, parameter_shapes, tp_partition_dim
from megamath.model.safetensors_io import save_safetensors
from megamath.model.tp_state_dict import tp_merge, tp_slice
from megamath.parallel.optimizer_config import GRAD_DTYPES
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.parallel.zero_checkpoint import CHECKPOINT_FORMAT, STATE_KEYS, validate_shards
from megamath.parallel.zero_layout import bucket_numel_for, read_flat, resolve_grad_dtype, saved_layout, zero_layout
from megamath.run_lock import FolderLock
from megamath.training import checkpoint as ckpt
from megamath.training.checkpoint import (CHECKPOINTS, LATEST, METADATA, checkpoint_files, complete_checkpoints,
                                          latest_checkpoint, model_file, optimizer_file, read_metadata, rng_file,
                                          step_dir_name)
from megamath.training.checkpoint_integrity import file_digest, verify_files


# ---- reading a checkpoint by parameter name ---------------------------------------------------------------

class TrainCheckpoint:
    """A complete training checkpoint's serial tensors, merged over its TP ranks on demand.

    Opening checks that every file is there, matches its recorded checksum (unless `verify` is False
    because the caller just checked) and is consistent (names, shapes, one step); the tensors stay
    memory-mapped until `weight(name)` / `param_state(name)` read one parameter.
    """

    def __init__(self, path: str | Path, verify: bool = True, with_optimizer: bool = True):
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        if verify:  # without the optimizer (an export), only the model files are read
            files = [f for f in self.meta["files"] if with_optimizer or f.startswith("model_")]
            verify_files(self.path, self.meta, files)
        self.config = ModelConfig.from_dict(self.meta["config"]["model"])
        self.tp_size, self.dp_size = self.meta["tp_size"], self.meta["dp_size"]
        self.local = local_shapes(self.config, self.tp_size)
        self._models = []
        for t in range(self.tp_size):
            handle = safe_open(str(self.path / model_file(t)), framework="pt")
            shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}
            if shapes != self.local:
                raise ValueError(f"{self.path / model_file(t)} does not hold TP rank {t}'s slices of the model in "
                                 f"metadata.json: {_difference(shapes, self.local)}")
            self._models.append(handle)
        self._shards, self._offsets = [], []
        for t in range(self.tp_size if with_optimizer else 0):
            shards = validate_shards([torch.load(self.path / optimizer_file(t, d), map_location="cpu", mmap=True,
                                                 weights_only=True) for d in range(self.dp_size)], self.tp_size, t)
            numels = {n: numel for n, numel, _ in shards[0]["params"]}
            if numels != {n: _numel(s) for n, s in self.local.items()}:
                raise ValueError(f"{self.path / optimizer_file(t, 0)}: the optimizer's parameters are not TP rank "
                                 f"{t}'s of the model in metadata.json")
            self._shards.append(shards)
            self._offsets.append({n: offset for n, _, offset in shards[0]["params"]})
        steps = [shards[0]["step"] for shards in self._shards]
        if len(set(steps)) > 1:
            raise ValueError(f"{self.path}: the optimizer shards of the TP ranks are at different steps {steps}")
        self.step_count = steps[0] if steps else None
        self.optimizer_config = self._shards[0][0]["config"] if self._shards else None

    def weight(self, name: str) -> torch.Tensor:
        """The serial model tensor `name`, in the stored dtype."""
        return self._merge(name, [handle.get_tensor(name) for handle in self._models], "weight")

    def param_state(self, name: str) -> dict[str, torch.Tensor]:
        """The serial fp32 master, exp_avg and exp_avg_sq of parameter `name`."""
        state = {}
        for key in STATE_KEYS:
            pieces = []
            for shards, offsets in zip(self._shards, self._offsets):
                buckets, dp = saved_layout(shards[0])
                flat = read_flat([s[key] for s in shards], buckets, dp, offsets[name], _numel(self.local[name]))
                pieces.append(flat.view(self.local[name]))  # this TP rank's slice
            state[key] = self._merge(name, pieces, key)
        return state

    def _merge(self, name: str, pieces: list[torch.Tensor], what: str) -> torch.Tensor:
        dim = tp_partition_dim(name, self.config, self.tp_size)
        if dim is not None:
            try:
                return tp_merge(pieces, name, self.config)
            except ValueError as err:  # nonzero vocabulary padding
                raise ValueError(f"{self.path}: the {what} of {err}") from None
        for t in range(1, len(pieces)):
            if not torch.equal(pieces[t], pieces[0]):
                raise ValueError(f"{self.path}: the {what} of replicated parameter {name} differs between TP ranks "
                                 f"0 and {t}")
        return pieces[0]


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _difference(found: dict, expected: dict) -> str:
    missing, unknown = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(f"{n} {found[n]} (expected {expected[n]})" for n in set(found) & set(expected)
                   if found[n] != expected[n])
    parts = [f"missing {', '.join(missing)}" if missing else "", f"unknown {', '.join(unknown)}" if unknown else "",
             f"wrong shapes {', '.join(wrong)}" if wrong else ""]
    return "; ".join(p for p in parts if p)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the one a run directory's `latest` names."""
    path = Path(path)
    if not (path / METADATA).is_file() and (path / CHECKPOINTS / LATEST).is_file():
        return latest_checkpoint(path)
    if not (path / METADATA).is_file() and path.name == CHECKPOINTS and (path / LATEST).is_file():
        return latest_checkpoint(path.parent)  # RUN_DIR/checkpoints given
    return path


# ---- writing a checkpoint of another layout ----------------------------------------------------------------

def default_dp_size(world_size: int, tp_size: int) -> int:
    """The old world size / the new TP size (the same number of processes), or 1 when TP outgrows it."""
    if tp_size >= world_size:
        return 1
    if world_size % tp_size:
        raise ValueError(f"the checkpoint's world size {world_size} is not divisible by the new tensor-parallel size "
                         f"{tp_size}: give the data-parallel size (--dp-size)")
    return world_size // tp_size


def _grad_dtype_after(source: TrainCheckpoint, tp_size: int, dp_size: int) -> str:
    """The gradient buffer's dtype of the run resumed at (tp_size, dp_size), which sizes its buckets: the run's
    grad_dtype, with "auto" resolved for the new layout (its weights' dtype, and its micro-batches per step at
    the same global batch). A guess that misses only costs a re-cut when the run loads the shards."""
    run = source.meta["config"]
    old_dp, accum = source.dp_size, run.get("grad_accum_steps", 1)
    micro_batches = accum * old_dp // dp_size if accum * old_dp % dp_size == 0 else None
    bf16_weights = source.weight("norm.weight").dtype == torch.bfloat16  # the smallest tensor; all share one dtype
    return resolve_grad_dtype(run.get("optimizer", {}).get("grad_dtype", "fp32"), bf16_weights, dp_size, tp_size,
                              micro_batches)


def optimizer_shards(source: TrainCheckpoint, names: list[str], tp_size: int, tp_rank: int, dp_size: int):
    """The ZeRO-1 shards (ZeroOptimizer.sharded_state_dict's format) of TP rank tp_rank's DP ranks, in order."""
    run = source.meta["config"]
    grad_bytes = GRAD_DTYPES[_grad_dtype_after(source, tp_size, dp_size)].itemsize
    bucket_numel = bucket_numel_for(run.get("parallel", {}).get("bucket_mb", 0.0), grad_bytes)  # the run's buckets
    yield from zero_shards(source.param_state, names, source.config, tp_size, tp_rank, dp_size, bucket_numel,
                           source.step_count, source.optimizer_config)


def zero_shards(param_state, names: list[str], config: ModelConfig, tp_size: int, tp_rank: int, dp_size: int,
                bucket_numel: int, step: int, optimizer_config: dict, read_once: bool = False):
    """ZeRO-1 shards of TP rank tp_rank's DP ranks, in order, from each parameter's serial fp32 state
    (`param_state(name)`: {"master", "exp_avg", "exp_avg_sq"}), placed as ZeroOptimizer places them with
    buckets of `bucket_numel` elements.

    A parameter spread over several DP ranks' pieces is read once per rank holding a piece of it, with one
    shard in memory at a time; `read_once` reads each parameter once and holds all the DP ranks' shards (the
    TP rank's whole state, 12 bytes per element), for a source whose reads are costly."""
    shapes = local_shapes(config, tp_size)
    layout = zero_layout([(n, shapes[n], tp_partition_dim(n, config, tp_size) is not None) for n in names], dp_size,
                         bucket_numel)
    params = [(slot.name, slot.numel, slot.offset) for slot in layout.slots]
    for group in ([list(range(dp_size))] if read_once else [[r] for r in range(dp_size)]):
        pieces = {r: layout.rank_pieces(r) for r in group}
        tensors = {r: {key: torch.zeros(layout.shard_size, dtype=torch.float32) for key in STATE_KEYS}  # padding 0
                   for r in group}
        for slot in layout.slots:
            owners = []  # (dp rank, flat range [lo, hi) it holds, where in its shard)
            for r in group:
                f0, f1, s0 = pieces[r][slot.bucket]
                lo, hi = max(slot.offset, f0), min(slot.offset + slot.numel, f1)
                if lo < hi:
                    owners.append((r, lo, hi, s0 + lo - f0))
            if not owners:
                continue
            for key, full in param_state(slot.name).items():
                piece = tp_slice(full, slot.name, config, tp_size, tp_rank).reshape(-1)  # (numel,)
                for r, lo, hi, start in owners:
                    tensors[r][key][start:start + hi - lo] = piece[lo - slot.offset:hi - slot.offset]
        for r in group:
            yield {"format": CHECKPOINT_FORMAT, "step": step, "config": optimizer_config,
                   "tp_size": tp_size, "tp_rank": tp_rank, "dp_size": dp_size, "dp_rank": r,
                   "shard_size": layout.shard_size, "buckets": [(b.start, b.end) for b in layout.buckets],
                   "params": params, **tensors.pop(r)}


def fresh_rng_state(seed: int) -> dict:
    """checkpoint.rng_state()'s format for generators seeded with `seed`, as loop.seed_rngs seeds them."""
    version, mt, gauss = random.Random(seed).getstate()
    name, keys, pos, has_gauss, cached = np.random.RandomState(seed % 2**32).get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": torch.Generator().manual_seed(seed).get_state()}


def _new_metadata(source: TrainCheckpoint, tp_size: int, dp_size: int) -> dict:
    meta = copy.deepcopy(source.meta)
    old = {"path": str(source.path), "tp_size": source.tp_size, "dp_size": source.dp_size}
    meta.pop("checksums", None)  # the new files get their own
    meta.update(tp_size=tp_size, dp_size=dp_size, world_size=tp_size * dp_size, resharded_from=old)
    parallel = meta["config"].setdefault("parallel", {})
    parallel["tp_size"] = tp_size
    if tp_size == 1:
        parallel["sequence_parallel"] = False  # needs TP > 1
    return meta


def _write_files(source: TrainCheckpoint, folder: Path, tp_size: int, dp_size: int) -> None:
    """Every file of the new layout into `folder`, metadata.json last."""
    seed = source.meta["config"]["seed"]

    def rng_state(rank: int) -> dict:
        if rank < source.meta["world_size"]:
            return torch.load(source.path / rng_file(rank), weights_only=True)
        return fresh_rng_state(seed + rank)

    write_checkpoint_files(folder, source.config, tp_size, dp_size, source.weight,
                           lambda names, tp_rank: optimizer_shards(source, names, tp_size, tp_rank, dp_size),
                           rng_state, _new_metadata(source, tp_size, dp_size))


def write_checkpoint_files(folder: Path, config: ModelConfig, tp_size: int, dp_size: int, weight, shards, rng_state,
                           meta: dict) -> None:
    """A TP tp_size × DP dp_size checkpoint's files into `folder`: per TP rank its slice of every `weight(name)`
    (serial) and the DP shards `shards(names, tp_rank)` yields, per rank `rng_state(rank)`, then `meta` with
    every file's checksum as metadata.json, last."""
    names = list(parameter_shapes(config))  # the model's own order
    for tp_rank in range(tp_size):
        tensors = {n: tp_slice(weight(n), n, config, tp_size, tp_rank).contiguous() for n in names}
        ckpt.write_checkpoint_file(lambda path, t=tensors: save_safetensors(t, path), folder / model_file(tp_rank))
        del tensors
        for dp_rank, shard in enumerate(shards(names, tp_rank)):
            ckpt.write_checkpoint_file(lambda path: torch.save(shard, path), folder / optimizer_file(tp_rank, dp_rank))
    for rank in range(tp_size * dp_size):
        state = rng_state(rank)
        ckpt.write_checkpoint_file(lambda path: torch.save(state, path), folder / rng_file(rank))
    meta = {**meta, "files": checkpoint_files(tp_size, dp_size)}
    meta["checksums"] = {name: file_digest(folder / name) for name in meta["files"]}
    ckpt.write_metadata(folder, meta)


def reshard_checkpoint(checkpoint: str | Path, output: str | Path, tp_size: int, dp_size: int | None = None) -> Path:
    """Write `checkpoint` (a step folder, or a run directory's latest) as a TP tp_size × DP dp_size checkpoint.

    The result is OUTPUT/checkpoints/step_XXXXXXX with `latest` naming it, so a run with run_dir OUTPUT and
    parallel.tp_size tp_size resumes from it. Written into a temp folder, metadata last, renamed into
    place, then `latest` replaced: a killed tool leaves no checkpoint behind, never half of one.
    """
    src = resolve_checkpoint(checkpoint)
    meta = read_metadata(src)
    check_output_outside(src, output)
    check_tensor_parallel(ModelConfig.from_dict(meta["config"]["model"]), tp_size)
    if dp_size is None:
        dp_size = default_dp_size(meta["world_size"], tp_size)
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"data-parallel size must be a positive integer, got {dp_size!r}")
    batch = meta.get("global_batch_size")
    if isinstance(batch, int) and batch % dp_size:  # a resume checks it: such a checkpoint could never resume
        raise ValueError(f"the checkpoint's global batch {batch} is not divisible by data-parallel size {dp_size}: "
                         "no run on it keeps that batch (micro_batch_size · grad_accum_steps · DP); give --dp-size "
                         "a divisor of it")
    return write_new_run(output, meta["step"], lambda folder: _write_files(TrainCheckpoint(src), folder, tp_size,
                                                                           dp_size), "reshard")


def write_new_run(output: str | Path, step: int, write, what: str) -> Path:
    """OUTPUT/checkpoints/step_XXXXXXX, its files written by `write(folder)` into a temp folder (metadata.json
    last), renamed into place, then `latest` naming it: a killed tool leaves no checkpoint behind, never half of
    one, and a run with run_dir OUTPUT resumes from it. `what` names the tool in the run lock and messages."""
    # One writer per run directory, as for training: two reshards into OUTPUT shared `.step_N.tmp`, each
    # deleting the other's files, and one left a checkpoint mixing both layouts that its checksums sealed.
    with FolderLock(output, what):
        root = Path(output) / CHECKPOINTS
        held = complete_checkpoints(root)
        if held:
            raise FileExistsError(f"{output} already holds checkpoints ({', '.join(p.name for _, p in held)}): "
                                  f"{what} into a new run directory")
        name = step_dir_name(step)
        final, tmp = root / name, root / f".{name}.tmp"
        if final.exists() or final.is_symlink():  # not a checkpoint (those are refused above): the rename would fail
            raise FileExistsError(f"{final} is in the way (it is not a checkpoint): move it, or {what} into a new "
                                  "run directory")
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a tool that was killed
        tmp.mkdir()
        try:
            write(tmp)
            fsync_path(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # refused input or a failed write: leave nothing half done
            raise
        fsync_path(root)
        write_text_atomically(root / LATEST, name + "\n")
        return final


def check_output_outside(src: Path, output: str | Path) -> None:
    """Refuse an OUTPUT that is, or is inside, the checkpoint read or the run directory holding it.

    Why: the new run was written into the input step folder (exit 0), so the source checkpoint held a
    second run's files, and a later prune or copy of either took the other with it."""
    out = Path(output).resolve()
    src = src.resolve()
    sources = [src] + ([src.parent.parent] if src.parent.name == CHECKPOINTS else [])
    for folder in sources:
        if out == folder or folder in out.parents:
            raise ValueError(f"{output} is {'inside ' if out != folder else ''}the run or checkpoint being "
                             f"resharded ({folder}): reshard into a new run directory")


# ---- resuming at another TP size directly ------------------------------------------------------------------

def load_checkpoint_any_tp(path: str | Path, model: torch.nn.Module, optimizer: ZeroOptimizer,
                           state: ParallelState, verify: bool = True) -> dict:
    """checkpoint.load_checkpoint, which also accepts a checkpoint of another TP size (returns its metadata).

    Same TP size: load_checkpoint as is (RNG states restored on an unchanged layout). Another TP size:
    every rank rebuilds the optimizer state of its shard's parameters by name from all old files (the
    masters become the weights, as on a DP change) and keeps its freshly seeded RNG states. Each rank
    reads its parameters' whole serial state, so for a large model `megamath reshard` once is cheaper.
    """
    meta = read_metadata(path)
    if meta["tp_size"] == state.tp_size:
        return ckpt.load_checkpoint(path, model, optimizer, state, verify=verify)
    source = TrainCheckpoint(path, verify=verify)
    if parameter_shapes(source.config) != parameter_shapes(model.config):
        raise ValueError(f"checkpoint {path} holds a model of another shape than this run's: "
                         f"{_difference(parameter_shapes(source.config), parameter_shapes(model.config))}")
    config, tp, rank = model.config, state.tp_size, state.tp_rank
    optimizer.load_param_states(
        lambda name: {k: tp_slice(v, name, config, tp, rank) for k, v in source.param_state(name).items()},
        source.step_count)
    return meta
