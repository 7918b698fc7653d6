"""`megamath overlap`: which test items share a word n-gram with a training corpus."""
from __future__ import annotations

import argparse

RULE = """\
n-grams (the rule of wellecks/overlap, used for LLEMMA's analysis):
  words are Python's str.split() (runs of non-whitespace; line breaks, tabs, runs of spaces and Unicode
  spaces such as U+00A0 all separate words alike); nothing else is normalised (case, punctuation, LaTeX
  and Unicode forms are kept); an n-gram is n consecutive words compared exactly. A test field with
  fewer than n words cannot hit.

output: one line per (test item, field, n, corpus document) sharing at least one n-gram:
  test_id, field, n, ngram (the first shared n-gram in the document), offset (its character offset in
  the document text), matching_ngrams (distinct shared n-grams), file, line, subset, split, meta.
  The summary (per subset, per test item) is printed and written to HITS.summary.json.
  Test ids: the record's --id-field when present (by default id, else unique_id as in MATH-500, the ids
  megamath eval gives), else its 0-based position in the test file; an --id-field other than id that no
  record has is an error."""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="train/test n-gram overlap between a jsonl test set and a corpus",
        description="Find the corpus documents that share a word n-gram with a test item (exact: candidates "
        "from a rolling hash are checked against the real n-gram), streaming, with N workers.",
        epilog=RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--test", required=True, metavar="FILE.jsonl", help="test set, one JSON record per line")
    parser.add_argument("--field", required=True, action="append", dest="fields", metavar="NAME",
                        help="test record field to check (repeat: --field question --field answer)")
    parser.add_argument("--corpus", required=True, nargs="+", action="extend", metavar="PATH",
                        help="ProofPile II root, subset or split folders, files or quoted globs of "
                        ".jsonl, .jsonl.zst, .jsonl.gz")
    parser.add_argument("--n", type=int, action="append", dest="ns", metavar="N",
                        help="n-gram length in words (repeat for several; default: 30)")
    parser.add_argument("--output", required=True, metavar="HITS.jsonl",
                        help="where the hits are written (replaced when it exists, as is HITS.summary.json)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes; 1 runs in-process (default: the number of CPUs)")
    parser.add_argument("--json-key", default="text", help="corpus record field holding the text (default: text)")
    parser.add_argument("--id-field", default="id", help="test record field holding its id (default: id, else unique_id)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.data.preprocess import default_workers
    from megamath.overlap.run import OverlapConfig, overlap, summary_path

    workers = default_workers() if args.workers is None else args.workers
    config = OverlapConfig(test=args.test, fields=args.fields, corpus=args.corpus, output=args.output,
                           ns=args.ns or [30], workers=workers, json_key=args.json_key, id_field=args.id_field,
                           progress=args.progress)
    summary = overlap(config)
    print(summary.format())
    print(f"hits: {args.output}; summary: {summary_path(args.output)}")
    return 0
