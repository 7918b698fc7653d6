"""`megamath report`: a self-contained HTML report (or a Markdown summary table) of one or more runs.

    megamath report runs/demo/train [runs/other ...] [--output report.html] [--skip-steps N] [--tokens 200e9]
    megamath report runs/demo/train --format md     # the summary table as Markdown, on stdout
"""
from __future__ import annotations

import math
from pathlib import Path


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="write an HTML report (summary, notes, plots) of training runs; compare several",
        description="Reads RUN_DIR/metrics.jsonl (and config.yaml, run_info.json) of each run and writes one "
        "self-contained HTML file: summary table, notes on what stands out, configuration differences, plots.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (a config's run_dir)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="the HTML file to write, replaced when it exists (default: report.html in the first "
                        "RUN_DIR)")
    parser.add_argument("--skip-steps", type=int, default=None, metavar="N",
                        help="warm-up steps left out of the steady-state figures (default: 5%% of the steps, at "
                        "least 1)")
    parser.add_argument("--tokens", type=float, default=None, metavar="N",
                        help="token budget of the projection (default: 200e9, LLEMMA's)")
    parser.add_argument("--comm-threshold", type=float, default=None, metavar="SHARE",
                        help="flag exposed communication above this share of the step time (default: 0.25)")
    parser.add_argument("--format", choices=("html", "md"), default="html",
                        help="html: write the report file; md: print the summary table as Markdown")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.report.html import write_report
    from megamath.report.notes import COMM_THRESHOLD
    from megamath.report.runs import load_runs
    from megamath.report.summary import (LLEMMA_TOKENS, current_layout, default_skip_steps, markdown_table,
                                         summarize)

    if args.skip_steps is not None and args.skip_steps < 0:
        raise ValueError(f"--skip-steps must be >= 0, got {args.skip_steps}")
    tokens = LLEMMA_TOKENS if args.tokens is None else args.tokens
    if not 0 < tokens < math.inf:
        raise ValueError(f"--tokens must be > 0 and finite, got {args.tokens}")
    threshold = COMM_THRESHOLD if args.comm_threshold is None else args.comm_threshold
    if not 0 <= threshold <= 1:
        raise ValueError(f"--comm-threshold must be a share between 0 and 1, got {threshold}")
    runs = load_runs(args.runs)
    skips = [default_skip_steps(len(current_layout(r))) if args.skip_steps is None else args.skip_steps for r in runs]
    if args.format == "md":
        print(markdown_table([summarize(r, k, tokens) for r, k in zip(runs, skips)]))
        return 0
    output = Path(args.output) if args.output else runs[0].path / "report.html"
    print(write_report(runs, output, skips, tokens, threshold))
    return 0
