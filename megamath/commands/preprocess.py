"""`megamath preprocess`: tokenize ProofPile II jsonl(.zst/.gz) into Megatron `.bin`/`.idx` datasets."""
from __future__ import annotations

import argparse
from pathlib import Path

NAMING = """\
output naming:
  files under <subset>/<split>/ (split: train, validation or test), e.g. a ProofPile II root's
  arxiv/train/*.jsonl.zst, make one dataset DIR/{subset}_{split}_{json_key}_document.{bin,idx}
  (arxiv_train_text_document); any other file makes DIR/{file stem}_{json_key}_document, the stem
  being its name without .jsonl, .jsonl.zst or .jsonl.gz. Files of a dataset are read in sorted
  name order, records in file order; the output is identical for any --workers.

bad lines (invalid JSON or UTF-8, not an object, missing key, text not a string, empty text) are
skipped, counted by reason and the first few printed as file:line; --strict stops at the first one.
A dataset is published only when complete: a failed or interrupted run leaves no partial output.
An existing dataset of the same name in DIR is replaced."""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="tokenize ProofPile II jsonl(.zst/.gz) into Megatron .bin/.idx datasets",
        description="Tokenize jsonl records with a SentencePiece model into Megatron-LM indexed datasets\n"
        "(one per subset and split), streaming, with a bounded number of batches in flight.",
        epilog=NAMING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="ProofPile II root, subset or split folders, files or quoted globs "
                        "of .jsonl, .jsonl.zst, .jsonl.gz")
    parser.add_argument("--tokenizer-model", required=True, type=Path, metavar="MODEL",
                        help="SentencePiece tokenizer.model (Llama family)")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR", help="folder for the datasets")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes; 1 runs in-process (default: the number of CPUs)")
    parser.add_argument("--json-key", default="text", help="record field holding the text (default: text)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the tokenizer's EOS id after every document (default: on)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad line instead of skipping it")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="skip, with a warning, .zst/.gz inputs that are empty or cannot be decompressed to "
                        "their end (default: such a file is an error)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.data.preprocess import PreprocessConfig, default_workers, format_summary, preprocess

    workers = default_workers() if args.workers is None else args.workers
    config = PreprocessConfig(inputs=args.input, tokenizer_model=args.tokenizer_model, output_dir=args.output_dir,
                              workers=workers, json_key=args.json_key, append_eod=args.append_eod,
                              strict=args.strict, skip_bad_files=args.skip_bad_files, progress=args.progress)
    print(format_summary(preprocess(config)))
    return 0
