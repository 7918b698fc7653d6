"""What a person should look at in a run, each a rule over metrics.jsonl with its threshold in the open.

    skipped steps         records with `skipped` (non-finite loss or gradient norm: no update was made)
    loss spikes           loss above the median of the previous LOSS_WINDOW losses by more than
                          max(SPIKE_MADS robust deviations, SPIKE_MIN_RISE of that median)
    throughput drops      steady-state steps below DROP_RATIO of the median tokens/s
    straggler rank        several ranks, the slowest/fastest step-time ratio's median above
                          STRAGGLER_RATIO, and one rank the slowest in at least STRAGGLER_SHARE of steps
    exposed communication grad_reduce + param_gather above `comm_threshold` of the step time: time the
                          ranks spend communicating and not computing (nothing overlaps it today)
    untimed time          the phases adding up to less than (1 - UNTIMED_SHARE) of the step time
    another layout        steps before run_info.json's `layout_since_step`: the rates leave them out
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from megamath.report.runs import Run
from megamath.report.summary import COMM_PHASES, phase_shares, steady, values

LOSS_WINDOW = 20
SPIKE_MADS = 6.0
SPIKE_MIN_RISE = 0.05
DROP_RATIO = 0.7
STRAGGLER_RATIO = 1.10
STRAGGLER_SHARE = 0.6
UNTIMED_SHARE = 0.05
COMM_THRESHOLD = 0.25
"""Default share of the step time above which exposed communication is flagged (--comm-threshold)."""


def _steps(steps: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


def loss_spikes(records: list[dict]) -> list[int]:
    """Steps whose loss jumped above the recent median (see the module docstring)."""
    spikes, history = [], []
    for rec in records:
        loss = rec.get("loss")
        if loss is None or not math.isfinite(loss):  # a NaN kept in the window made every later median NaN:
            continue  # no spike was found for LOSS_WINDOW steps (the skipped-steps note reports such steps)
        if len(history) >= 5:
            recent = np.array(history[-LOSS_WINDOW:])
            med = float(np.median(recent))
            mad = 1.4826 * float(np.median(np.abs(recent - med)))
            if loss - med > max(SPIKE_MADS * mad, SPIKE_MIN_RISE * abs(med)):
                spikes.append(rec["step"])
        history.append(loss)
    return spikes


def run_notes(run: Run, skip_steps: int, comm_threshold: float = COMM_THRESHOLD) -> list[str]:
    """One sentence per finding, most serious first; empty when nothing stands out."""
    notes = []
    recs = steady(run, skip_steps)
    skipped = [r["step"] for r in run.records if r.get("skipped")]
    if skipped:
        notes.append(f"{len(skipped)} step(s) skipped on a non-finite loss or gradient norm (no update): "
                     f"steps {_steps(skipped)}.")
    spikes = loss_spikes(run.records)
    if spikes:
        notes.append(f"Loss spike(s) at step(s) {_steps(spikes)}: the loss rose well above the median of the "
                     f"previous {LOSS_WINDOW} steps.")
    speeds = values(recs, "tokens_per_s")
    if speeds:
        med = float(np.median(speeds))
        slow = [r for r in recs if r.get("tokens_per_s") is not None and r["tokens_per_s"] < DROP_RATIO * med]
        if slow:
            worst = min(slow, key=lambda r: r["tokens_per_s"])
            notes.append(f"Throughput drop(s): {len(slow)} step(s) below {DROP_RATIO:.0%} of the median "
                         f"{med:,.0f} tokens/s (steps {_steps([r['step'] for r in slow])}; slowest step "
                         f"{worst['step']} at {worst['tokens_per_s']:,.0f} tokens/s).")
    ranked = [r for r in recs if r.get("slowest_rank") is not None and r.get("step_time_min_s")]
    if ranked:
        ratio = float(np.median([r["step_time_max_s"] / r["step_time_min_s"] for r in ranked]))
        rank, count = Counter(r["slowest_rank"] for r in ranked).most_common(1)[0]
        if ratio > STRAGGLER_RATIO and count / len(ranked) >= STRAGGLER_SHARE:
            notes.append(f"Straggler: rank {rank} was the slowest in {count / len(ranked):.0%} of steps; the slowest "
                         f"rank's step time is {ratio:.2f}× the fastest's (median).")
    shares = phase_shares(recs)
    comm = sum(shares.get(p, 0.0) for p in COMM_PHASES)
    if comm > comm_threshold:
        notes.append(f"Exposed communication: grad_reduce + param_gather take {comm:.0%} of the step time "
                     f"(threshold {comm_threshold:.0%}), time no computation hides.")
    if shares and sum(shares.values()) < 1 - UNTIMED_SHARE:
        notes.append(f"{1 - sum(shares.values()):.0%} of the step time is outside the timed phases.")
    since = run.info.get("layout_since_step")
    if isinstance(since, int) and run.records[0]["step"] < since <= run.records[-1]["step"]:
        notes.append(f"Steps {run.records[0]['step']}–{since - 1} ran on another layout (devices, TP or DP), or on "
                     f"one no run_info.json recorded; the throughput, MFU and projections are those of steps "
                     f"{since}– on this one.")
    if not run.info:
        notes.append("No run_info.json (a run from before it existed): the device count and layout are unknown.")
    return notes
