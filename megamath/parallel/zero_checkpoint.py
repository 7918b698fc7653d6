"""ZeRO-1 optimizer checkpoints: the shard format, and re-cutting saved shards into a live optimizer of any
DP size or bucket layout (or from per-parameter states, the way in from another TP size).

Each DP rank saves its fp32 master, exp_avg and exp_avg_sq pieces with the layout that produced them
(parameter names, sizes and flat offsets; v2 adds the buckets). A loader finds every parameter by name in
the old layout and cuts this rank's pieces out of the old shards without building the full vectors
(zero_layout.read_flat), so resuming on another DP size reads only what it needs. `opt` is a
megamath.parallel.zero.ZeroOptimizer, whose methods of the same names call these.
"""
from __future__ import annotations

import dataclasses

import torch

from megamath.parallel.zero_layout import read_flat, saved_layout

CHECKPOINT_FORMAT = "megamath-zero1-v2"
"""v2: bucketed shards (zero_layout.py). v1 shards (one rank-major range per rank) still load."""
CHECKPOINT_FORMATS = ("megamath-zero1-v1", CHECKPOINT_FORMAT)
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
"""The per-parameter fp32 tensors a shard holds, in the order shards and tools list them."""


def sharded_state_dict(opt) -> dict:
    """This rank's optimizer state and the layout needed to re-cut it for another DP size or layout.

    The tensors are the live fp32 shards (S,): save them (torch.save) before the next step.
    """
    opt.finish_param_sync()  # an overlapped step's updates, before anything reads the shards
    return {
        "format": CHECKPOINT_FORMAT, "step": opt.step_count, "config": dataclasses.asdict(opt.config),
        "tp_size": opt.state.tp_size, "tp_rank": opt.state.tp_rank,
        "dp_size": opt.dp_size, "dp_rank": opt.dp_rank, "shard_size": opt.shard_size,
        "buckets": [(b.start, b.end) for b in opt.buckets],
        "params": [(s.name, s.numel, s.offset) for s in opt.slots],
        "master": opt.master, "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq,
    }


@torch.no_grad()
def load_sharded_state_dicts(opt, shards: list[dict]) -> None:
    """Resume from the shards saved by ALL DP ranks of a run (same TP rank), whatever its DP size and
    layout (v1 rank-major shards, or v2 buckets of any size).

    Each parameter is found by name in the old layout and this rank's new pieces are cut from the old
    shards without building the full vectors. The masters, rounded to the model's dtype, are also
    written into the model's parameters (they are the source of truth the bf16 weights came from).
    """
    opt.finish_param_sync()  # nothing in flight may still write what is loaded
    old = validate_shards(shards, opt.state.tp_size, opt.state.tp_rank)
    old_slots = {name: (numel, offset) for name, numel, offset in old[0]["params"]}
    mine = {s.name: s.numel for s in opt.slots}
    if mine != {n: numel for n, (numel, _) in old_slots.items()}:
        missing = sorted(set(mine) - set(old_slots))
        unexpected = sorted(set(old_slots) - set(mine))
        resized = sorted(n for n in set(mine) & set(old_slots) if mine[n] != old_slots[n][0])
        raise ValueError(f"load_sharded_state_dicts: the checkpoint's parameters differ from the model's: "
                         f"missing {missing}, unexpected {unexpected}, different sizes {resized}")
    old_buckets, old_dp = saved_layout(old[0])
    for key in STATE_KEYS:
        target, old_shards = getattr(opt, key), [s[key] for s in old]
        target.zero_()
        for slot, lo, hi, start in opt._param_pieces():
            old_offset = old_slots[slot.name][1] + (lo - slot.offset)
            target[start:start + hi - lo] = read_flat(old_shards, old_buckets, old_dp, old_offset, hi - lo)
    opt.step_count = old[0]["step"]
    opt._sync_params_from_masters()


@torch.no_grad()
def load_param_states(opt, param_state, step: int) -> None:
    """Resume from whole per-parameter states: `param_state(name)` gives {"master", "exp_avg",
    "exp_avg_sq"} of parameter `name` as this rank holds it (fp32, its shape or flat).

    The way in for a checkpoint of another layout (another TP size: megamath.training.reshard), where
    each parameter is rebuilt by name. Only the parameters overlapping this rank's shard are asked
    for. As in load_sharded_state_dicts, the masters (rounded) become the model's weights.
    """
    shard: dict[str, list[tuple[int, torch.Tensor]]] = {key: [] for key in STATE_KEYS}
    for slot, lo, hi, start in opt._param_pieces():
        state = param_state(slot.name)
        for key in STATE_KEYS:
            flat = state[key].reshape(-1)  # (numel,)
            if flat.numel() != slot.numel:
                raise ValueError(f"load_param_states: {key} of {slot.name} has {flat.numel()} elements, the "
                                 f"parameter {slot.numel}")
            shard[key].append((start, flat[lo - slot.offset:hi - slot.offset]))  # (hi - lo,)
    opt.finish_param_sync()  # nothing in flight may still write what is loaded
    for key in STATE_KEYS:  # only now: a refused load changes nothing
        target = getattr(opt, key)
        target.zero_()
        for start, piece in shard[key]:
            target[start:start + piece.numel()] = piece
    opt.step_count = step
    opt._sync_params_from_masters()


def saved_shard_size(shard: dict) -> int:
    """The length S of a saved shard's tensors (v1 or v2)."""
    return shard["shard_size"] if "shard_size" in shard else shard["shard"][1] - shard["shard"][0]


def validate_shards(shards: list[dict], tp_size: int, tp_rank: int) -> list[dict]:
    """The shards of TP rank tp_rank's whole DP group, sorted by DP rank; a clear error for anything else."""
    if not shards:
        raise ValueError("load_sharded_state_dicts: got no shards")
    for s in shards:
        if not isinstance(s, dict) or s.get("format") not in CHECKPOINT_FORMATS:
            raise ValueError(f"load_sharded_state_dicts: not a megamath ZeRO-1 optimizer shard "
                             f"({' or '.join(CHECKPOINT_FORMATS)})")
    shards = sorted(shards, key=lambda s: s["dp_rank"])
    dp_size = shards[0]["dp_size"]
    ranks = [s["dp_rank"] for s in shards]
    if ranks != list(range(dp_size)) or any(s["dp_size"] != dp_size for s in shards):
        raise ValueError(f"load_sharded_state_dicts: need the shards of all {dp_size} DP ranks exactly once, "
                         f"got DP ranks {ranks}")
    first = shards[0]
    if (first["tp_size"], first["tp_rank"]) != (tp_size, tp_rank):
        raise ValueError(f"load_sharded_state_dicts: the shards are of TP rank {first['tp_rank']} of "
                         f"{first['tp_size']}, this process is TP rank {tp_rank} of {tp_size} "
                         "(resharding across tensor parallelism goes through megamath.training.reshard: "
                         "`megamath reshard`)")
    for s in shards[1:]:
        if ((s["params"], s["step"], s["tp_rank"], s.get("buckets"))
                != (first["params"], first["step"], first["tp_rank"], first.get("buckets"))):
            raise ValueError(f"load_sharded_state_dicts: DP rank {s['dp_rank']}'s shard is from another run or step "
                             "(its layout, step or TP rank differs from DP rank 0's)")
    size = saved_shard_size(first)
    for s in shards:
        if any(s[k].numel() != size for k in STATE_KEYS):
            raise ValueError(f"load_sharded_state_dicts: DP rank {s['dp_rank']}'s tensors do not have the shard "
                             f"size {size}")
    return shards
