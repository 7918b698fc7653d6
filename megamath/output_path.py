"""Checks on a command's output file made before its work starts.

Generation, evaluation and overlap scans write their one output file at the end, after minutes or hours:
a path that cannot be written must fail before that work, not after it; and an output that is one of the
command's inputs (`--output` given the test set's name) must not replace it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when both paths exist and are one file (a link or another spelling counts)."""
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def prepare_output_file(path: str | Path, flag: str = "--output", inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output `path` that is a folder, lies under a file or in a folder this process cannot write,
    or is one of `inputs` or an existing file inside one (a model folder, say); create its missing parent
    folders. Returns `path` as a Path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; name a file")
    if path.exists() and not path.is_file():  # /dev/null, a pipe: written through, in place
        return path
    for source in inputs:
        if same_file(path, source):
            raise ValueError(f"{flag} {path} is also an input ({source}); writing it would replace that input")
        if path.is_file() and os.path.isdir(source) and path.resolve().is_relative_to(Path(source).resolve()):
            # a new file beside a model's (a run folder's) files is fine; replacing one of them is not
            raise ValueError(f"{flag} {path} is a file of the input {source}; writing it would replace it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {folder} (permission denied)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
