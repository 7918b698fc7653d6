"""The one check on a file a command reads, made before the read so a wrong path is one line naming it.

A folder and a missing path are refused with their own wording; anything else that exists is read,
regular or not, so process substitution (`--prompts <(zstdcat p.jsonl.zst)`) and /dev/stdin work.
"""
from __future__ import annotations

from pathlib import Path


def require_file(path: str | Path, what: str) -> Path:
    """`path` as a Path; `what {path} is a folder, not a file` or `what not found: {path}` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path
