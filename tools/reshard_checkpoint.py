#!/usr/bin/env python
"""Change a training checkpoint's tensor-parallel size: the same entry as `megamath reshard`.

    python tools/reshard_checkpoint.py --checkpoint RUN/checkpoints/step_0004000 --tp-size 4 --output RUN_TP4 \\
        [--dp-size 16]

Megatron-LM's checkpoint conversion changes TP by loading and saving whole models; this streams one
parameter at a time and also carries the ZeRO-1 optimizer state (masters and Adam moments).
"""
import sys
from pathlib import Path

# Runnable from a checkout without installing: the repository root holds the `megamath` package. Appended:
# an installed megamath comes first, and the root's kernels/ never shadows the package named `kernels` that
# transformers imports since 5.25.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from megamath.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["reshard", *sys.argv[1:]]))
