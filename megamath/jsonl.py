"""Reading small jsonl files of records (test sets, prompts, evaluation results) with errors that name the line.

The corpus is read elsewhere (megamath.data.sources: compressed, streamed, bad lines counted); this is for
the files a user writes or a tool produced, where any bad line is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megamath.input_path import require_file


def read_jsonl_objects(path: str | Path, what: str = "file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; a missing file, a line that is not JSON
    or not a JSON object is a one-line error naming `what`, the path and the line."""
    path = require_file(path, what)
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is an error naming it, like bad JSON
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record


def is_text(value: str) -> bool:
    """False for a string holding a lone surrogate (JSON's `\\ud800` escape gives one): it is no Unicode
    text, and the tokenizer refuses it with a traceback far from the line it came from."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

