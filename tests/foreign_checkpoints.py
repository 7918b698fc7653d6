"""Helpers of the tests of `megamath convert megatron-to-hf` and `neox-to-hf`: the checkpoints they read,
written once per test process (trainer_checkpoints), each with the logits of the model it holds; run a
direction, expect its one-line error, copy a checkpoint to damage it, re-save a rank file after a change;
and the trainers' own files, for the opt-in comparisons."""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import trainer_checkpoints as tc
from megamath.cli import main
from megamath.compat.pickle_guard import Foreign, guarded_load, plain_args

CHECKPOINTS = {  # name: (seed of the source model, its config fields, writer)
    "megatron/torch_tp2_pp2": (1, {}, lambda m, p: tc.write_megatron_torch(m, p, tp=2, pp=2)),
    "megatron/torch_pp2_vp2": (2, {}, lambda m, p: tc.write_megatron_torch(m, p, tp=1, pp=2, vp=2)),
    "megatron/torch_dist_tp2": (3, {}, lambda m, p: tc.write_megatron_torch_dist(m, p, tp=2)),
    "neox/llemma_tp2": (4, tc.NEOX["llemma"], lambda m, p: tc.write_neox(m, p, "llemma")),
    "neox/llemma_gqa_tp2": (5, tc.NEOX["llemma_gqa"], lambda m, p: tc.write_neox(m, p, "llemma_gqa")),
    "neox/main_gqa_tp2": (6, tc.NEOX["main_gqa"], lambda m, p: tc.write_neox(m, p, "main_gqa")),
}
TRAINER_FILES = "MEGAMATH_TRAINER_FILES"  # a folder the fixture scripts wrote, with megatron/ and neox/ in it
_written: dict[str, tuple[Path, torch.Tensor]] = {}
_root: list[Path] = []  # this process's folder of written checkpoints, made on first use


def _folder() -> Path:
    if not _root:
        _root.append(Path(tempfile.mkdtemp(prefix="megamath-foreign-")))
        atexit.register(shutil.rmtree, _root[0], ignore_errors=True)
    return _root[0]


def written(name: str) -> Path:
    """The checkpoint `name` of CHECKPOINTS, written on first use (read-only by convention: copy() to damage)."""
    if name not in _written:
        seed, fields, write = CHECKPOINTS[name]
        model = tc.source_model(seed, **fields)
        path = _folder() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(model, path)
        _written[name] = (path, tc.logits(model))
    return _written[name][0]


def expected_logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, the float32 logits of the model checkpoint `name` holds)."""
    written(name)
    return tc.INPUT_IDS, _written[name][1]


def trainer_files(name: str) -> Path:
    """The checkpoint `name` as the trainer itself wrote it (tests/fixtures/*/write_fixtures.py), where
    MEGAMATH_TRAINER_FILES names their folder; skipped otherwise (Megatron-LM and GPT-NeoX are not
    dependencies, and their files are not committed)."""
    root = os.environ.get(TRAINER_FILES)
    if not root:
        pytest.skip(f"{TRAINER_FILES} is not set: the trainers' own files are written by hand with "
                    "tests/fixtures/*/write_fixtures.py (the layouts are tested on files written here)")
    path = Path(root) / name
    if not path.exists():
        pytest.fail(f"{TRAINER_FILES}={root} has no {name}")
    return path


def convert(direction: str, src, dst, *extra) -> None:
    assert main(["convert", direction, str(src), str(dst), "--dtype", "float32", *extra]) == 0


def fail(direction: str, src, dst, capsys, *extra) -> str:
    """The error line of a conversion that must fail and leave no DST behind."""
    assert main(["convert", direction, str(src), str(dst), *extra]) == 2
    assert not Path(dst).exists()
    return capsys.readouterr().err.removeprefix("megamath convert: error: ").rstrip("\n")


def copy(name: str, tmp_path) -> Path:
    """A writable copy of the checkpoint `name` (e.g. "megatron/torch_tp2_pp2")."""
    return Path(shutil.copytree(written(name), tmp_path / Path(name).name))


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


class Trainer:
    """One trainer's checkpoints and its convert direction, so that a test file names neither again:
    `convert, fail, copy, written, logits = Trainer("megatron", "megatron-to-hf").helpers()`."""

    def __init__(self, trainer: str, direction: str) -> None:
        self.trainer, self.direction = trainer, direction

    def convert(self, src, dst, *extra) -> None:
        convert(self.direction, src, dst, *extra)

    def fail(self, src, dst, capsys, *extra) -> str:
        return fail(self.direction, src, dst, capsys, *extra)

    def copy(self, name: str, tmp_path) -> Path:
        return copy(f"{self.trainer}/{name}", tmp_path)

    def written(self, name: str) -> Path:
        """A checkpoint in trainer_checkpoints' layout, of a model with known logits."""
        return written(f"{self.trainer}/{name}")

    def logits(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return expected_logits(f"{self.trainer}/{name}")

    def helpers(self) -> tuple:
        return self.convert, self.fail, self.copy, self.written, self.logits
