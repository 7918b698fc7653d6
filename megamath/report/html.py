"""The report page: summary table, notes, config differences, figures; one file, nothing fetched.

Everything is inline (CSS in a <style>, figures as data URIs), so the file can be mailed, attached to
a pull request or opened offline, and shows the same thing everywhere.
"""
from __future__ import annotations

import datetime
import html
from pathlib import Path

from megamath.atomic_io import write_text_atomically
from megamath.output_path import prepare_output_file
from megamath.report.figures import all_figures
from megamath.report.notes import COMM_THRESHOLD, run_notes
from megamath.report.runs import CONFIG, METRICS, RUN_INFO, Run
from megamath.report.summary import LLEMMA_TOKENS, config_differences, summarize, table_rows
from megamath.training.phases import PHASES

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; display: block; }
figcaption { font-weight: bold; margin-bottom: 0.4em; }
.notes li { margin: 0.3em 0; }
.ok { color: #2a7a2a; }
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(runs: list[Run], skip_steps: list[int], token_budget: float = LLEMMA_TOKENS,
                 comm_threshold: float = COMM_THRESHOLD) -> str:
    """The page as a string; skip_steps gives each run's warm-up steps left out."""
    summaries = [summarize(r, k, token_budget) for r, k in zip(runs, skip_steps)]
    names = [r.name for r in runs]
    parts = [f"<h1>megamath training report</h1><p>{html.escape(', '.join(str(r.path) for r in runs))} — "
             f"written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
             "<h2>Summary</h2>", _table(["", *names], table_rows(summaries)),
             "<p>Medians over the steps after the warm-up; tokens/s, TFLOP/s and MFU count training work "
             "(evaluation, checkpoints and profiler left out); the projection to the token budget uses the mean whole step "
             "time, evaluation and checkpoints included.</p>"]
    phase_names = [p for p in PHASES if any(p in s["phases"] for s in summaries)]
    if phase_names:
        rows = [[p] + [f"{s['phases'][p]:.1%}" if p in s["phases"] else "–" for s in summaries] for p in phase_names]
        parts += ["<h3>Share of step time per phase</h3>", _table(["phase", *names], rows)]
    parts.append("<h2>Notes</h2>")
    for run, k in zip(runs, skip_steps):
        found = run_notes(run, k, comm_threshold)
        label = f"<h3>{html.escape(run.name)}</h3>" if len(runs) > 1 else ""
        items = "".join(f"<li>{html.escape(n)}</li>" for n in found) or "<li class='ok'>Nothing stands out.</li>"
        parts.append(f"{label}<ul class='notes'>{items}</ul>")
    if len(runs) > 1:
        diffs = config_differences(runs)
        parts.append("<h2>Configuration differences</h2>")
        parts.append(_table(["key", *names], [[k, *[str(v) for v in vals]] for k, vals in diffs]) if diffs
                     else "<p>The configurations are the same (run_dir apart).</p>")
    parts.append("<h2>Plots</h2>")
    for title, uri in all_figures(runs):
        parts.append(f"<figure><figcaption>{html.escape(title)}</figcaption><img alt=\"{html.escape(title)}\" "
                     f"src=\"{uri}\"></figure>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>megamath report: "
            f"{html.escape(', '.join(names))}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(runs: list[Run], output: Path, skip_steps: list[int], token_budget: float = LLEMMA_TOKENS,
                 comm_threshold: float = COMM_THRESHOLD) -> Path:
    read = [run.path / name for run in runs for name in (METRICS, CONFIG, RUN_INFO)]
    output = prepare_output_file(output, inputs=read)
    write_text_atomically(output, build_report(runs, skip_steps, token_budget, comm_threshold))
    return output
