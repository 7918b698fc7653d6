"""The run directory's lock for a whole training job, agreed by every rank.

Rank 0 takes `RUN_DIR/.megamath.lock` (megamath.run_lock) before anything is written, removes the
temporary checkpoint folders of dead attempts (safe only under the lock), checks that checkpoints can be
written at all (not at the first save, hours in), and draws an attempt id that names this attempt's
temporary folders. One gather tells every rank whether the lock was taken, the attempt id and the lock
file's contents, so a refused job stops on all ranks at once instead of hanging in a collective.

Every rank writes its own files of each checkpoint into one folder, so every rank must see rank 0's
RUN_DIR, not a folder of the same name on a node-local disk or a relative path resolved from another
working directory (ranks that read other checkpoints issue other collectives and hang the job): each
rank finds rank 0's lock file there, and checks that it can write there too, before the first step.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from megamath.parallel.mappings import all_gather_objects
from megamath.parallel.state import ParallelState
from megamath.run_lock import LOCK_NAME, FolderBusyError, FolderLock
from megamath.training import checkpoint as ckpt


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, state: ParallelState) -> Iterator[str]:
    """Hold `run_dir`'s lock on rank 0 for the block; yields the attempt id (the same on every rank)."""
    lock, failure, holder = None, None, None
    attempt = int.from_bytes(os.urandom(6), "little")  # not the seeded RNGs: resume must not see a draw
    if state.rank == 0:
        try:
            lock = FolderLock(run_dir, "training").acquire()
            holder = _lock_text(run_dir)
            ckpt.remove_stale_temporaries(run_dir / ckpt.CHECKPOINTS)
            ckpt.check_writable(run_dir / ckpt.CHECKPOINTS)
        except OSError as err:
            failure = err
    if state.is_distributed:
        ok, attempt, holder = all_gather_objects((failure is None, attempt, holder), state.world_group)[0]
        if not ok and failure is None:
            failure = FolderBusyError(f"rank 0 could not lock {run_dir} (see its message)")
        if failure is None:
            problems = all_gather_objects(None if state.rank == 0 else _rank_problem(run_dir, holder, state.rank),
                                          state.world_group)
            problem = next((p for p in problems if p is not None), None)
            if problem is not None:
                failure = OSError(problem)
    if failure is not None:
        if lock is not None:  # refused after taking the lock: this process may try again (tests, notebooks)
            lock.release()
        raise failure
    try:
        yield f"{attempt:x}"
    finally:
        if lock is not None:
            lock.release()


def _lock_text(run_dir: Path) -> str | None:
    try:
        return (run_dir / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _rank_problem(run_dir: Path, holder: str | None, rank: int) -> str | None:
    """Why this rank (not 0) cannot save into rank 0's `run_dir`, or None."""
    if holder is not None and _lock_text(run_dir) != holder:
        return (f"rank {rank} does not see rank 0's run directory: {run_dir} there holds no lock file of this job "
                "(a node-local disk, or a relative run_dir from another working directory?); every rank writes its "
                "share of each checkpoint into one folder, so run_dir must be one folder on a filesystem all ranks "
                "share")
    root = run_dir / ckpt.CHECKPOINTS
    try:
        ckpt.check_writable(root if os.path.lexists(root) else run_dir)
    except OSError as err:
        return f"rank {rank}: {err}"
    return None
