"""`megamath checkpoint verify RUN_DIR|STEP_DIR`: check training checkpoints offline, every rank's files.

    megamath checkpoint verify runs/demo/train            # every checkpoint of the run, newest last
    megamath checkpoint verify runs/demo/train/checkpoints/step_0000300

One line per checkpoint: intact, or what is wrong (the file, expected and found size or SHA-256).
Exit status 0 when every checkpoint checked is intact, 1 when any is broken, 2 on bad input.
The work lives in megamath.training.checkpoint_integrity.
"""
from __future__ import annotations


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="inspect training checkpoints (verify: check every file's size and checksum)",
        description="verify: check a training checkpoint folder, or every checkpoint of a run directory (step "
        "folders and ones set aside as .corrupt), against the sizes and SHA-256 digests recorded in their "
        "metadata.json; prints one line per checkpoint. Exit 0 when all are intact, 1 when any is broken.")
    parser.add_argument("action", choices=("verify",))
    parser.add_argument("path", metavar="RUN_DIR|STEP_DIR", help="a run directory or one step_XXXXXXX folder")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.training.checkpoint_verify import checkpoints_to_verify, verify_checkpoint

    results = [verify_checkpoint(path) for path in checkpoints_to_verify(args.path)]
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1
