"""The `megamath` console entry point: one subcommand per module in `megamath/commands/`.

Each command module exposes `add_parser(subparsers)` (declares its flags) and `run(args) -> int`.
The CLI only parses and calls; the work lives in the library.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under megamath.commands
COMMANDS = {
    "preprocess": "preprocess",
    "inspect": "inspect",
    "demo-corpus": "demo_corpus",
    "blend": "blend",
    "merge": "merge",
    "convert": "convert",
    "train": "train",
    "reshard": "reshard",
    "plan": "plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamath", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"megamath.commands.{module_name}")
        module.add_parser(subparsers, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input: one clear line, no traceback.
        print(f"megamath {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
