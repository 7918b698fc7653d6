"""Crash-safe publishing of files, shared by datasets, index caches and checkpoints.

The rule everywhere: write beside the target under a temporary name, fsync, rename over the target,
fsync the folder. A process killed at any point leaves either the old file or the new one, never a
half-written file under the real name.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import BinaryIO, Callable

_temp_counter = itertools.count()


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to disk; a folder the filesystem refuses
    to fsync is skipped, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, then publish it as `path`."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        # A device or pipe (`--output /dev/null`): a rename would replace it with a regular file; write through.
        with open(path, "wb") as f:
            write(f)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_temp_counter)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text.encode("utf-8")))
