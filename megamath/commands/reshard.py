"""`megamath reshard`: rewrite a training checkpoint for another tensor-parallel (and data-parallel) size.

    megamath reshard --checkpoint RUN/checkpoints/step_0004000 --tp-size 4 --output RUN_TP4 [--dp-size 16]

The work (merging each parameter's TP slices, then cutting them for the new size) lives in
megamath.training.reshard; this parses and reports.
"""
from __future__ import annotations


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="rewrite a training checkpoint for another tensor-parallel size",
        description="Reads a complete training checkpoint saved at any TP x DP size and writes the same state "
        "(weights, fp32 masters, Adam moments, step, RNG states) as a checkpoint for TP size N and DP size M "
        "under OUTPUT/checkpoints/, with `latest` naming it: train with run_dir OUTPUT and parallel.tp_size N "
        "to resume. OUTPUT must not hold checkpoints yet (nor a step folder of the same name), be in use by a "
        "training or another reshard, or be or lie inside the checkpoint or run directory it reads.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint folder (RUN_DIR/checkpoints/step_XXXXXXX) or a run directory (its latest)")
    parser.add_argument("--tp-size", required=True, type=int, metavar="N", help="the new tensor-parallel size")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="run directory to write the checkpoint into")
    parser.add_argument("--dp-size", type=int, default=None, metavar="M",
                        help="the new data-parallel size (default: the old world size / N, or 1 when N is larger)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.training.checkpoint import read_metadata
    from megamath.training.reshard import reshard_checkpoint

    path = reshard_checkpoint(args.checkpoint, args.output, args.tp_size, args.dp_size)
    meta = read_metadata(path)
    old = meta["resharded_from"]
    tp, dp = meta["tp_size"], meta["dp_size"]
    print(f"resharded step {meta['step']} from TP {old['tp_size']} x DP {old['dp_size']} to TP {tp} x DP {dp}: {path}")
    print(f"resume with run_dir={args.output} parallel.tp_size={tp} on {tp * dp} processes; keep the global batch "
          f"{meta['global_batch_size']} = micro_batch_size x grad_accum_steps x {dp}")
    return 0
