"""`megamath config`: turn a GPT-NeoX config or a Megatron-LM command line into a megamath training config.

    megamath config from-neox llemma_7b.yml [data.yml ...] [--output CONFIG.yaml]
    megamath config from-megatron [--output CONFIG.yaml] -- --tensor-model-parallel-size 2 --bf16 ...
    megamath config from-megatron [--output CONFIG.yaml] train_llama.sh

The config is written to --output (or stdout), with what was not converted, and why, as comments at its
end; the same report goes to the console. A value megamath cannot train (pipeline parallelism, dropout,
a non-Llama model) is an error naming the key.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="convert a GPT-NeoX config or a Megatron-LM command line to a "
                                   "megamath training config", description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    neox = actions.add_parser("from-neox", help="a GPT-NeoX YAML config (several files are merged as GPT-NeoX does)")
    neox.add_argument("files", nargs="+", metavar="FILE.yml", help="GPT-NeoX config file(s)")
    megatron = actions.add_parser(
        "from-megatron", help="Megatron-LM training flags, or a file holding the command line",
        description="Give the flags after `--`, or from the launcher on (torchrun ... pretrain_gpt.py ...), or "
        "one FILE holding that command line (a shell script: comments and backslash continuations are fine; "
        "shell variables must be expanded first).")
    megatron.add_argument("--world-size", type=int, default=None, metavar="N",
                          help="GPUs of the job, to turn --global-batch-size into accumulation steps (default: "
                          "torchrun's --nnodes × --nproc_per_node when the command line has them)")
    megatron.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="flags or FILE")
    for sub in (neox, megatron):
        sub.add_argument("--output", type=Path, default=None, metavar="CONFIG.yaml",
                         help="where to write the megamath config (default: stdout)")
        sub.add_argument("--force", action="store_true", help="overwrite --output when it exists")
        sub.add_argument("--vocab-size", type=int, default=None, metavar="N",
                         help="the tokenizer's vocabulary size, when the tokenizer file is not at hand")
        sub.set_defaults(run=run)


def run(args) -> int:
    from megamath.atomic_io import write_text_atomically

    for flag, value in (("--world-size", getattr(args, "world_size", None)), ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.output is not None and args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    if args.action == "from-neox":
        from megamath.compat.neox import convert_neox, read_neox_yaml

        conversion = convert_neox(read_neox_yaml(args.files), args.vocab_size, source=", ".join(args.files))
    else:
        from megamath.compat.megatron import convert_megatron, read_command_line

        words, source = read_command_line(args.args)
        conversion = convert_megatron(words, world_size=args.world_size, vocab_size=args.vocab_size, source=source)
    text = conversion.to_yaml()
    if args.output is not None:  # --force replaces an old output, never the source being converted
        from megamath.output_path import prepare_output_file

        prepare_output_file(args.output, "--output", args.files if args.action == "from-neox" else [source])
    if args.output is None:
        sys.stdout.write(text)
        print(conversion.report(), file=sys.stderr)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.output, text)
        print(conversion.report())
        print(f"wrote {args.output}; run it with: megamath train --config {args.output}")
    return 0
