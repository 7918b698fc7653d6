"""Reading a file or folder a command is given, checked first so a wrong path or a binary file is one line naming it.

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


def require_folder(path: str | Path, kind: str) -> Path:
    """`path` as a Path; `{path} not found`, or `{path} is a file; {kind} is a folder` otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; {kind} is a folder")
    return path


def read_text(path: str | Path, what: str, kind: str) -> str:
    """The UTF-8 text of `path` (require_file's checks first); a file that is not UTF-8 text is one line
    naming where it breaks and asking whether it is `kind` (e.g. "a YAML file")."""
    path = require_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): is it {kind}?") from None
