"""Settings every rank must hold equal, compared across the job before they are used.

Why: torchrun starts each rank with its own command line and environment, and on several nodes with its
own disks. A rank given another value (an override left off one node's launch line, a `RUN_DIR` that
differs, a stale copy of the data on one node) either trains something else with exit 0 (another lr
updates its ZeRO shard at its own rate, another data folder feeds its TP group other tokens), or issues
other collectives than its peers and hangs the job until the timeout. One gather at start-up turns each
of these into one line naming the key and the ranks' values.
"""
from __future__ import annotations

from typing import Mapping

from megamath.dotted_keys import flatten
from megamath.parallel.mappings import all_gather_objects

SHOWN = 3
"""Keys named in the error; the rest are counted."""


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def disagreement(per_rank: list[Mapping]) -> str | None:
    """'key: A on rank 0, B on rank 3; ...' for keys where some rank's value differs from rank 0's, else None."""
    flat = [flatten(settings) for settings in per_rank]
    missing = object()
    keys = sorted(set().union(*flat))
    differ = []
    for key in keys:
        ours = flat[0].get(key, missing)
        other = next((r for r, values in enumerate(flat) if values.get(key, missing) != ours), None)
        if other is not None:
            show = [("unset" if v is missing else _shown(v)) for v in (ours, flat[other].get(key, missing))]
            differ.append(f"{key}: {show[0]} on rank 0, {show[1]} on rank {other}")
    if not differ:
        return None
    more = f"; and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
    return "; ".join(differ[:SHOWN]) + more


def check_same_on_every_rank(settings: Mapping, group, what: str, advice: str) -> None:
    """Raise ValueError on every rank of `group` (None: one process, nothing to compare) when a rank's
    `settings` differ from rank 0's; `what` names them in the message, `advice` says what to do."""
    problem = disagreement(all_gather_objects(dict(settings), group))
    if problem is not None:
        raise ValueError(f"the ranks hold different {what}: {problem} ({advice})")
