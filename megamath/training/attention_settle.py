"""The attention a run settles on at its first start, shared by every rank and kept for its resumes.

Why: `model.attention: auto` and our flash-attention kernel's tiles are chosen by timing on the GPU at
start-up (megamath.model.attention.choose_attention). Timings vary from rank to rank and from start to
start, so ranks could run different tiles, and a resumed run could pick another implementation or other
tiles than the run it continues: its losses would then drift from an uninterrupted run's in the last
bits. So rank 0's tiles are used by every rank (the implementation is already agreed: SDPA only when every
rank timed it faster), and the choice is written to RUN_DIR/attention.json. A later start with the same
setting, kernels, GPU model, per-rank shape, dtype, q/k/v layout (fused or not, sequence first or not:
the race runs attention as the model does) and PyTorch version (its SDPA backends, a settled one among
them, come with it) reads it and times nothing; anything else is timed again and the file rewritten, the
log line saying why. A field the saved key lacks (written before megamath
recorded it, e.g. the layout) is not a change: the run keeps computing what it computed. Called once the
optimizer has placed the weights, since whether q/k/v are fused depends on where their weights lie.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megamath.atomic_io import write_text_atomically
from megamath.model.attention import QKVLayout, choose_attention
from megamath.model.llama import Llama
from megamath.model.ops import get_ops
from megamath.parallel.mappings import all_gather_objects
from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig

FILE = "attention.json"
ADDED_FIELDS = {"qkv_layout", "torch"}
"""Key fields that a file written by an earlier megamath lacks: their absence is not a change."""


def settle_attention(model: Llama, config: TrainConfig, state: ParallelState, run_dir: Path,
                     dtype: torch.dtype) -> str:
    """Set model.attention (and our kernel's tiles) for this run on every rank; returns the log line."""
    attention = model.layers[0].self_attn
    hq, hkv = attention.local_heads()
    shape = (config.micro_batch_size, config.data.seq_length, hq, hkv, config.model.head_dim)
    ops = get_ops(config.model.kernels, state.device)
    layout = attention.qkv_layout(ops)
    key = {"setting": config.model.attention, "kernels": ops.backend, "shape": list(shape), "dtype": str(dtype),
           "device": torch.cuda.get_device_name(state.device) if state.device.type == "cuda" else state.device.type,
           "qkv_layout": layout.describe(), "torch": torch.__version__}
    saved = all_gather_objects(_read(run_dir / FILE) if state.rank == 0 else None, state.world_group)[0]
    if saved is not None and _same(saved.get("key"), key):
        record, line = saved, f"{saved['reason']} (kept from this run's first start, {FILE})"
    else:
        record, line = _choose(key, ops, shape, dtype, state, layout)
        if saved is not None:
            old = saved.get("key") if isinstance(saved.get("key"), dict) else {}
            changed = sorted(name for name in key if name in old and old[name] != key[name])
            line += f" (timed again: {', '.join(changed) or 'the saved choice'} changed since {FILE} was written)"
        if state.rank == 0:
            write_text_atomically(run_dir / FILE, json.dumps(record, indent=1) + "\n")
    model.attention = record["attention"]
    if record["tiles"] is not None:
        from megamath.kernels.flash_attention import FlashAttentionBlocks, use_blocks  # Triton only on this path

        use_blocks(shape[-1], dtype, FlashAttentionBlocks(**record["tiles"]))
    return line


def _choose(key: dict, ops, shape: tuple, dtype: torch.dtype, state: ParallelState,
            layout: QKVLayout) -> tuple[dict, str]:
    """Time on every rank; agree on the implementation (SDPA only if every rank prefers it, then rank 0's
    backend) and on rank 0's tiles. Returns the record for the file and the log line."""
    choice = choose_attention(key["setting"], ops, shape, dtype, state.device, layout=layout)
    chosen, reason = choice.attention, choice.reason
    if state.is_distributed and key["setting"] == "auto":
        preferred = all_gather_objects(chosen, state.world_group)
        chosen = "megamath" if "megamath" in preferred else preferred[0]
        if chosen != choice.attention:
            reason += ("; megamath on every rank, as another preferred it" if chosen == "megamath"
                       else f"; {chosen} on every rank, as rank 0 preferred it")
    tiles = dataclasses.asdict(choice.tiles) if choice.tiles is not None else None
    tiles = all_gather_objects(tiles, state.world_group)[0]  # rank 0's, on every rank
    return {"key": key, "attention": chosen, "tiles": tiles, "reason": reason}, reason


def _same(saved_key, key: dict) -> bool:
    """Whether a saved key describes this start: equal in every field, bar those of ADDED_FIELDS it lacks."""
    return (isinstance(saved_key, dict) and key.keys() - ADDED_FIELDS <= saved_key.keys() <= key.keys()
            and all(saved_key[name] == key[name] for name in saved_key))


def _read(path: Path) -> dict | None:
    """The saved choice, or None when there is none or it cannot be read (it is then timed again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"key", "attention", "tiles", "reason"} <= record.keys() else None
