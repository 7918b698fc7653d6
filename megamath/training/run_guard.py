"""The run directory's lock for a whole training job, agreed by every rank.

Rank 0 takes `RUN_DIR/.megamath.lock` (megamath.run_lock) before anything is written, removes the
temporary checkpoint folders of dead attempts (safe only under the lock), checks that checkpoints can be
written at all (not at the first save, hours in), and draws an attempt id that
names this attempt's temporary folders. One broadcast tells every rank whether the lock was taken and
the attempt id, so a refused job stops on all ranks at once instead of hanging in a collective.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from megamath.parallel.mappings import broadcast_
from megamath.parallel.state import ParallelState
from megamath.run_lock import FolderBusyError, FolderLock
from megamath.training import checkpoint as ckpt


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, state: ParallelState) -> Iterator[str]:
    """Hold `run_dir`'s lock on rank 0 for the block; yields the attempt id (the same on every rank)."""
    lock, failure = None, None
    attempt = int.from_bytes(os.urandom(6), "little")  # not the seeded RNGs: resume must not see a draw
    if state.rank == 0:
        try:
            lock = FolderLock(run_dir, "training").acquire()
            ckpt.remove_stale_temporaries(run_dir / ckpt.CHECKPOINTS)
            ckpt.check_writable(run_dir / ckpt.CHECKPOINTS)
        except OSError as err:
            failure = err
            if lock is not None:  # refused after taking the lock: this process may try again (tests, notebooks)
                lock.release()
                lock = None
    if state.is_distributed:
        shared = torch.tensor([0 if failure else 1, attempt], dtype=torch.int64, device=state.device)
        broadcast_(shared, 0, state.world_group)
        ok, attempt = bool(shared[0].item()), int(shared[1].item())
        if not ok and failure is None:
            failure = FolderBusyError(f"rank 0 could not lock {run_dir} (see its message)")
    if failure is not None:
        raise failure
    try:
        yield f"{attempt:x}"
    finally:
        if lock is not None:
            lock.release()
