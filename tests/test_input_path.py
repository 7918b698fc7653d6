"""Files a command reads: a folder and a missing path are one line each, worded the same by every reader, and
a pipe (process substitution, /dev/stdin) is read like a file instead of being called missing."""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from megamath.compat.megatron import read_command_line
from megamath.data.tokenizer import load_sentencepiece
from megamath.jsonl import read_jsonl_objects
from megamath.training.config import read_yaml
from generation_fixtures import build_tokenizer

READERS = {
    "jsonl": lambda path: list(read_jsonl_objects(path, "prompts file")),
    "yaml": lambda path: read_yaml(Path(path), "config file"),
    "tokenizer": load_sentencepiece,
}
WHAT = {"jsonl": "prompts file", "yaml": "config file", "tokenizer": "tokenizer model"}


@pytest.mark.parametrize("reader", READERS)
def test_a_folder_and_a_missing_path_are_one_line_each(tmp_path, reader):
    with pytest.raises(IsADirectoryError, match=f"^{WHAT[reader]} {re.escape(str(tmp_path))} is a folder, not a file$"):
        READERS[reader](tmp_path)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"^{WHAT[reader]} not found: {re.escape(str(missing))}$"):
        READERS[reader](missing)


def _pipe_of(data: bytes) -> str:
    """A /dev/fd path of a pipe a thread fills with `data`, as bash's `<(...)` gives a command."""
    read_end, write_end = os.pipe()

    def fill():
        with os.fdopen(write_end, "wb") as f:
            f.write(data)
    threading.Thread(target=fill, daemon=True).start()
    return f"/dev/fd/{read_end}"


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd to name a pipe")
def test_a_pipe_is_read_like_a_file(tmp_path):
    assert [record for _, record in read_jsonl_objects(_pipe_of(b'{"prompt": "1+1="}\n'), "prompts file")] == \
        [{"prompt": "1+1="}]
    assert read_yaml(Path(_pipe_of(b"train_steps: 3\n")), "config file") == {"train_steps": 3}
    model = build_tokenizer(tmp_path / "t.model")
    assert load_sentencepiece(_pipe_of(model.read_bytes())).GetPieceSize() == 400
    assert read_command_line([_pipe_of(b"--num-layers 2 --hidden-size 64\n")])[0][:2] == ["--num-layers", "2"]
