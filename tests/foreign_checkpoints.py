"""Helpers of the tests of `megamath convert megatron-to-hf` and `neox-to-hf`: run a direction, expect
its one-line error, copy a fixture to damage it, re-save a rank file after a change."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from megamath.cli import main
from megamath.compat.pickle_guard import Foreign, guarded_load, plain_args

FIXTURES = Path(__file__).parent / "fixtures"


def convert(direction: str, src, dst, *extra) -> None:
    assert main(["convert", direction, str(src), str(dst), "--dtype", "float32", *extra]) == 0


def fail(direction: str, src, dst, capsys, *extra) -> str:
    """The error line of a conversion that must fail and leave no DST behind."""
    assert main(["convert", direction, str(src), str(dst), *extra]) == 2
    assert not Path(dst).exists()
    return capsys.readouterr().err.removeprefix("megamath convert: error: ").rstrip("\n")


def copy(fixture: str, tmp_path) -> Path:
    """A writable copy of tests/fixtures/{fixture} (e.g. "megatron/torch_tp2_pp2")."""
    return Path(shutil.copytree(FIXTURES / fixture, tmp_path / Path(fixture).name))


def rewrite(path: Path, change) -> None:
    """Re-save one rank file after `change(state)`; pickled args keep their plain values only (the trainer's
    own classes, loaded inert, cannot be pickled again)."""
    state = guarded_load(path)
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = argparse.Namespace(**{k: v for k, v in plain_args(state["args"]).items()
                                              if not isinstance(v, Foreign)})
    change(state)
    torch.save(state, path.with_suffix(".new"))  # a new file: the loaded tensors are mapped from the old one
    os.replace(path.with_suffix(".new"), path)
