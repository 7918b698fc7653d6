"""The README's commands and config keys exist: a renamed flag or key must fail here, not in a user's shell."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from megamath.cli import build_parser
from megamath.training.config import TrainConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
FOREIGN_KEYS = {"optimizer.params.lr"}  # GPT-NeoX's own key, named where the README maps it onto ours
FILE_NAME = re.compile(r"\.(jsonl|json|yaml|yml|py|html|md)$")  # `metrics.jsonl` is a file, not a key


def command_lines() -> list[str]:
    """Each `megamath ...` (or `-m megamath.cli ...`) line of the README's code blocks, continuations joined."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"(?:^|\s)(?:megamath|-m megamath\.cli)\s+(.*)", line)
            if found:
                lines.append(found.group(1).split(" #")[0].split(" -- ")[0])  # after `--`: Megatron's own flags
    return lines


def _subcommands(parser: argparse.ArgumentParser) -> dict | None:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


@pytest.mark.parametrize("line", command_lines())
def test_every_command_line_names_a_command_and_its_flags(line):
    words, parser = line.split(), build_parser()
    while (commands := _subcommands(parser)) is not None:
        assert words and words[0] in commands, f"no command {words[:1]} in: {line}"
        parser = commands[words.pop(0)]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(words)))
    assert named <= flags, f"{sorted(named - flags)} not flags of {parser.prog}"


def test_the_readme_shows_the_main_commands():
    assert len(command_lines()) >= 15  # the parser above found the blocks


def _section(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name] if dataclasses.is_dataclass(cls) and name in hints else None


def test_every_config_key_named_exists():
    sections = {name for name, kind in typing.get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(kind)}
    keys = {key for key in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)(?:[:=][^`]*)?`", README)
            if key.split(".")[0] in sections and not FILE_NAME.search(key)} - FOREIGN_KEYS
    assert {"metrics.peak_tflops", "model.attention", "checkpoint.resume"} <= keys
    for key in sorted(keys):
        node = TrainConfig
        for part in key.split("."):
            node = _section(node, part)
            assert node is not None, f"README names {key}, which TrainConfig does not have"


def test_every_example_script_line_runs_as_shown():
    """`bash examples/launch_multinode.sh` alone stopped at its usage line: a script that requires an argument
    (`${1:?usage}`) must be shown with one, and every script the README runs must exist."""
    root = Path(__file__).resolve().parents[1]
    shown = [line.split(" #")[0].split() for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
             for line in block.replace("\\\n", " ").splitlines() if re.match(r"\s*(bash|sbatch) examples/", line)]
    assert len(shown) >= 2
    for runner, script, *args in shown:
        assert (root / script).is_file(), f"{runner} {script}: no such file"
        if "${1:?" in (root / script).read_text():
            assert args, f"`{runner} {script}` without the argument the script requires"
