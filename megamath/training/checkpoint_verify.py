"""Whole training checkpoints checked offline: every rank's files against metadata.json's sizes and SHA-256.

The library side of `megamath checkpoint verify RUN_DIR|STEP_DIR`; loading checks only what a rank reads
(checkpoint.py, with checkpoint_integrity's primitives).
"""
from __future__ import annotations

from pathlib import Path

from megamath.training.checkpoint import CHECKPOINTS, METADATA, read_metadata
from megamath.training.checkpoint_integrity import verify_files


def verify_checkpoint(path: str | Path) -> tuple[bool, str]:
    """(intact, one-line description) of a whole checkpoint folder: every rank's files."""
    path = Path(path)
    try:
        meta = read_metadata(path, check_files=False)
        verify_files(path, meta, meta["files"])
    except (ValueError, OSError, KeyError) as err:
        return False, f"{path}: BROKEN: {err}"
    note = "" if "checksums" in meta else " (saved without checksums: only presence checked)"
    return True, f"{path}: intact, step {meta['step']}, {len(meta['files'])} files{note}"


def checkpoints_to_verify(path: str | Path) -> list[Path]:
    """A step folder as given, or every checkpoint folder of a run directory (oldest first)."""
    path = Path(path)
    if not path.is_dir():
        fault = "is a file, not a folder" if path.exists() else "not found"
        raise FileNotFoundError(f"{path} {fault} (give a run directory or a step_XXXXXXX folder)")
    if (path / METADATA).is_file() or path.name.startswith("step_"):
        return [path]
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if not found:
        raise FileNotFoundError(f"no checkpoints under {root}")
    return found
