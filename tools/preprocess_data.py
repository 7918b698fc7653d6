#!/usr/bin/env python
"""Megatron-LM's `tools/preprocess_data.py`, the megamath way: the same entry as `megamath preprocess`.

    python tools/preprocess_data.py --input DATA --tokenizer-model tokenizer.model --output-dir OUT \\
        [--workers N] [--json-key text] [--append-eod/--no-append-eod] [--strict]

Differences from Megatron's script: outputs are named per ProofPile II subset and split under
--output-dir (see --help) instead of one --output-prefix, the tokenizer is always SentencePiece, and
.jsonl.zst/.jsonl.gz inputs are read directly.
"""
import sys
from pathlib import Path

# Runnable from a checkout without installing: the repository root holds the `megamath` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamath.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
