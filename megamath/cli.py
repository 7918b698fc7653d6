"""The `megamath` console entry point: one subcommand per module in `megamath/commands/`.

Each command module exposes `add_parser(subparsers)` (declares its flags) and `run(args) -> int`.
The CLI only parses and calls; the work lives in the library.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

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
    "overlap": "overlap",
    "overlap-accuracy": "overlap_accuracy",
    "checkpoint": "checkpoint",
    "config": "config",
    "report": "report",
    "generate": "generate",
    "eval": "eval",
    "serve": "serve",
    "plan": "plan",
}

DESCRIPTION = ("Megatron-style continued pretraining of math language models (the LLEMMA recipe): data, "
               "training, conversion, evaluation and planning.")
EPILOG = ("`megamath COMMAND --help` lists a command's flags. Training runs under torchrun: "
          "torchrun --standalone --nproc_per_node 8 -m megamath.cli train --config examples/llemma_7b.yaml")


def build_parser() -> argparse.ArgumentParser:
    # What a user reads first: the tool, not this module (whose docstring is for developers).
    parser = argparse.ArgumentParser(prog="megamath", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"megamath.commands.{module_name}")
        module.add_parser(subparsers, name)
        command = subparsers.choices[name]
        command.set_defaults(command_parser=command)  # its own usage for errors main() finds (a flag typo)
        # Whole flag names only, as Megatron-LM parses them: `--worker` for --workers would break the day
        # another flag starts the same way, and a typo of one flag must not silently select another.
        command.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a flag typo: the command's usage and `megamath CMD: error`, not the top level's `megamath: error`
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:
        # stdout's reader left (`megamath plan ... | head`): stop quietly, as a Unix filter does, with
        # stdout pointed at /dev/null so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status for SIGINT (128 + 2), not a traceback from wherever it landed.
        if args.debug:
            raise
        print(f"megamath {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as err:
        # A count too large for this machine (numpy names the allocation): one line, status 1 as for a GPU OOM.
        if args.debug:
            raise
        print(f"megamath {args.command}: error: out of memory: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        # A collective broken by another rank's failure: one line that points at that rank, not a traceback.
        # PyTorch's host allocator failing (a size too large for this machine) is a RuntimeError too.
        from megamath.parallel.peer_failure import lost_peer

        if args.debug or (line := lost_peer(err) or _host_out_of_memory(err)) is None:
            raise
        print(f"megamath {args.command}: error: {line}", file=sys.stderr)
        return 1
    except ChildProcessError as err:
        # A worker process died (killed, out of memory) or failed: not the input's fault, so status 1, as a
        # lost rank; one line, the worker's own traceback with --debug.
        if args.debug:
            raise
        print(f"megamath {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        # Bad input or an OS error on a user's path (missing, exists, read-only, a file where a folder goes,
        # locked, a corrupt checkpoint): one clear line, no traceback, unless --debug.
        if args.debug:
            raise
        print(f"megamath {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _host_out_of_memory(err: RuntimeError) -> str | None:
    """PyTorch's CPU allocator refusing an allocation, as one line (None for any other RuntimeError)."""
    message = " ".join(str(err).split())
    at = message.find("DefaultCPUAllocator: can't allocate memory")
    return None if at < 0 else f"out of memory: {message[at:]}"


def _one_line(err: BaseException) -> str:
    """The message of an error, with the path an OSError carries when its message lacks it."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # raised by the OS, not by us
        if (isinstance(err, FileExistsError) and isinstance(err.filename, (str, bytes, os.PathLike))
                and os.path.lexists(err.filename) and not os.path.isdir(err.filename)):
            return f"{err.filename}: exists and is not a folder"  # mkdir met a file where a folder goes
        if isinstance(err, NotADirectoryError) and isinstance(err.filename, (str, os.PathLike)):
            # a/file/x/y: name the file in the way, not the deepest path that could not be made under it
            blocker = next((p for p in Path(err.filename).parents if os.path.lexists(p)), None)
            if blocker is not None and not blocker.is_dir():
                return f"{blocker}: exists and is not a folder"
        # a failed rename (os.replace(temp, target)) names the temporary file first: the user's path is the target
        return f"{err.filename2 if err.filename2 is not None else err.filename}: {err.strerror}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
