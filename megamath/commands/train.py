"""`megamath train`: parse the config and its overrides, join torchrun's job, call the training loop.

    torchrun --nproc_per_node 8 -m megamath.cli train --config examples/llemma_7b.yaml optimizer.lr=5e-5

Exit status: 0 when training finished or was preempted (a checkpoint was saved), 1 when it stopped on
non-finite losses or out of GPU memory (a memory snapshot is written first), 2 on a bad config or input.
"""
from __future__ import annotations

import sys

from megamath.commands import leaves_process_group


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="train (or continue training) a model from a YAML config; launch with torchrun",
        description="Reads FILE into the training config, applies the dotted overrides (values parsed as YAML "
        "scalars, e.g. optimizer.lr=1e-4 model.activation_checkpointing=true), then trains on the ranks "
        "torchrun started (one process without torchrun).")
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML training config")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    parser.add_argument("--resume", default=None, metavar="auto|never|PATH",
                        help="where to continue from (default: the config's checkpoint.resume, auto: "
                        "RUN_DIR/checkpoints/latest when present)")
    parser.set_defaults(run=run)


@leaves_process_group
def run(args) -> int:
    from megamath.parallel.state import ParallelState
    from megamath.training.config import load_config
    from megamath.training.loop import NonFiniteError, train
    from megamath.training.profiling import OutOfMemoryStop

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    config = load_config(args.config, overrides)
    state = ParallelState.from_env(config.parallel.tp_size, timeout_s=config.parallel.timeout_minutes * 60,
                                   same_on_every_rank=config.to_dict())
    try:
        train(config, state)
    except (NonFiniteError, OutOfMemoryStop) as err:
        print(f"megamath train: error: {err}", file=sys.stderr)
        return 1
    return 0
