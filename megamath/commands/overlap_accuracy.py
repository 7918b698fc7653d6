"""`megamath overlap-accuracy`: accuracy on test problems found in the corpus vs the others."""
from __future__ import annotations

import argparse
import sys

FORMAT = """\
HITS.jsonl: the output of megamath overlap (its test_id field).
RESULTS.jsonl: one line per problem, as megamath eval writes it, with at least
  id       equal to the hits' test_id (the test record's id field, else unique_id, else its 0-based position);
           compared as text, so 7 and "7" match
  correct  true/false (0/1 accepted)
  level    MATH's difficulty level, for --by level (--by takes any field name)
A problem counts as a hit when any hit line names it (narrow with --field / --n, which must name a field and
n the overlap run checked: HITS.summary.json beside the hits says which)."""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="accuracy on problems that overlap the corpus vs the rest (LLEMMA's analysis)",
        description="Join megamath overlap hits with megamath eval results and print accuracy on hit and "
        "non-hit problems, overall and per group.",
        epilog=FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hits", required=True, metavar="HITS.jsonl", help="output of megamath overlap")
    parser.add_argument("--results", required=True, metavar="RESULTS.jsonl", help="per-problem eval results")
    parser.add_argument("--by", default=None, metavar="FIELD", help="also split by this results field (e.g. level)")
    parser.add_argument("--field", action="append", dest="fields", metavar="NAME",
                        help="count only hits on this test field (repeatable; default: all)")
    parser.add_argument("--n", type=int, action="append", dest="ns", metavar="N",
                        help="count only hits at this n (repeatable; default: all)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.overlap.accuracy import accuracy_by_hit, check_filters, format_rows, read_hits, read_results

    hits = read_hits(args.hits)
    hit_ids = hits.ids(args.fields, args.ns)
    for warning in check_filters(hits, args.fields, args.ns):
        print(f"warning: {warning}", file=sys.stderr)
    results = read_results(args.results, args.by)
    rows, unmatched = accuracy_by_hit(hit_ids, results)
    if unmatched:
        example = ", ".join(sorted(unmatched)[:5])
        print(f"warning: {len(unmatched):,} of {len(hit_ids):,} hit test ids have no result (e.g. {example}); "
              "do the ids of the test file and the results match?", file=sys.stderr)
        if len(unmatched) == len(hit_ids):
            raise ValueError("no hit test id appears in the results: the two files do not describe the same test set")
    print(format_rows(rows, args.by))
    return 0
