"""`megamath merge` (not yet implemented)."""
from __future__ import annotations


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="(not yet implemented)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise NotImplementedError("megamath merge")
