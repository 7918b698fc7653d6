"""The numbers of the summary table, each a plain statistic of metrics.jsonl fields.

Steady state: the records of the layout run_info.json describes, after their first `skip_steps`
(warm-up: allocator growth, compilation, cold caches). Throughput figures are medians over them, which
one slow step (an eval, a hiccup of the machine) does not move; their spread is the 10th–90th
percentile. The projection to a token budget uses the MEAN whole-step time instead (evaluation and
checkpoints included), because over 200B tokens every second of overhead is paid.
"""
from __future__ import annotations

import math

import numpy as np

from megamath.dotted_keys import flatten
from megamath.model.config import ModelConfig
from megamath.report.runs import Run

LLEMMA_TOKENS = 200e9
"""LLEMMA 7B's continued-pretraining budget (tokens), the default of --tokens."""
COMM_PHASES = ("grad_reduce", "param_gather")


def default_skip_steps(n_records: int) -> int:
    """Warm-up steps left out when --skip-steps is not given: 5% of the steps, at least 1 (none of 1)."""
    return 0 if n_records <= 1 else max(1, n_records // 20)


def current_layout(run: Run) -> list[dict]:
    """The records of the steps run on the layout run_info.json describes (`layout_since_step` on), or all
    of them (older runs, or none left)."""
    since = run.info.get("layout_since_step")
    if not isinstance(since, int):
        return run.records
    return [r for r in run.records if r["step"] >= since] or run.records


def steady(run: Run, skip_steps: int) -> list[dict]:
    """The current layout's records after its first skip_steps (all of them when that would leave none):
    throughput, MFU and the projections are those of the devices run_info.json counts."""
    records = current_layout(run)
    return records[skip_steps:] or records


def values(records: list[dict], key: str) -> list[float]:
    """The finite numbers of `key` (a field, or `phases.name`) over records, skipping nulls and absences."""
    out = []
    for rec in records:
        value = rec
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append(float(value))
    return out


def median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def seq_length(run: Run) -> int | None:
    return (run.config.get("data") or {}).get("seq_length") or run.info.get("seq_length")


def tokens_per_step(run: Run) -> int | None:
    """Global batch (samples) × sequence length; the batch from consumed_samples / step, exact."""
    last = run.records[-1]
    if not seq_length(run) or not last.get("consumed_samples"):
        return None
    return last["consumed_samples"] // last["step"] * seq_length(run)


def tokens_so_far(run: Run) -> int | None:
    """Tokens trained on up to the last logged step: consumed samples × sequence length."""
    samples = run.records[-1].get("consumed_samples")
    return samples * seq_length(run) if samples is not None and seq_length(run) else None


def describe_model(config: dict) -> str:
    try:
        model = ModelConfig.from_dict(config["model"])
    except Exception:  # an older or foreign config: say what is known
        return "?"
    n = model.num_params()
    size = f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"
    return (f"{size} params: {model.num_layers} layers, hidden {model.hidden_size}, "
            f"{model.num_heads} heads / {model.num_kv_heads} KV, vocab {model.vocab_size}")


def describe_layout(run: Run) -> str:
    parallel = run.config.get("parallel") or {}  # null: the defaults
    tp = run.info.get("tp_size", parallel.get("tp_size", 1))
    dp = run.info.get("dp_size", "?")
    parts = [f"TP {tp} × DP {dp}"]
    if parallel.get("sequence_parallel"):
        parts.append("SP")
    if (run.config.get("model") or {}).get("activation_checkpointing"):
        parts.append("activation checkpointing")
    if "micro_batch_size" in run.config:
        parts.append(f"micro-batch {run.config['micro_batch_size']} × {run.config.get('grad_accum_steps', 1)} "
                     "accumulated")
    return ", ".join(parts)


def summarize(run: Run, skip_steps: int, token_budget: float = LLEMMA_TOKENS) -> dict:
    """Every number of the run's column of the summary table (None where the run has no such data)."""
    recs = steady(run, skip_steps)
    world = run.info.get("world_size")
    per_step = tokens_per_step(run)
    step_times = values(recs, "step_time_s")
    mfu = values(recs, "mfu")
    out = {
        "run": run.name, "model": describe_model(run.config), "layout": describe_layout(run),
        "gpus": f"{world} × {run.info.get('device_name', '?')}" if world else "?",
        "steps": len(run.records), "last_step": run.records[-1]["step"], "skipped_warmup": len(run.records) - len(recs),
        "tokens_per_s": median(values(recs, "tokens_per_s")),
        "tflops": median(values(recs, "tflops")),
        "mfu": median(mfu), "mfu_p10": percentile(mfu, 10), "mfu_p90": percentile(mfu, 90),
        "step_time_s": median(step_times),
        "peak_mem_gib": max(values(run.records, "max_mem_gib"), default=None),
        "j_per_token": median(values(recs, "j_per_token")),
        "tokens_so_far": tokens_so_far(run),
        "token_budget": token_budget,
    }
    rate = per_step / float(np.mean(step_times)) if per_step and step_times else None  # whole-step tokens/s
    out["budget_hours"] = token_budget / rate / 3600 if rate else None
    out["budget_gpu_hours"] = out["budget_hours"] * world if out["budget_hours"] is not None and world else None
    out["remaining_hours"] = (max(token_budget - out["tokens_so_far"], 0) / rate / 3600
                              if rate and out["tokens_so_far"] is not None else None)
    out["phases"] = phase_shares(recs)
    return out


def phase_shares(records: list[dict]) -> dict[str, float]:
    """Each phase's share of the total step time over `records` (sum of its seconds / sum of step times)."""
    total = sum(values(records, "step_time_s"))
    names = []
    for rec in records:
        names += [n for n in rec.get("phases", {}) if n not in names]
    return {n: sum(values(records, f"phases.{n}")) / total for n in names} if total > 0 else {}


# ---- rendering ----------------------------------------------------------------------------------------

ROWS = (
    ("model", "model"), ("layout", "parallel layout"), ("gpus", "devices"), ("steps", "steps logged"),
    ("skipped_warmup", "warm-up steps left out"), ("tokens_per_s", "tokens/s (median)"),
    ("tflops", "TFLOP/s per device (median)"), ("mfu", "MFU (median, p10–p90)"), ("step_time_s", "step time (median)"),
    ("peak_mem_gib", "peak memory"), ("j_per_token", "energy per token"), ("tokens_so_far", "tokens so far"),
    ("budget_hours", "time to the token budget"), ("budget_gpu_hours", "GPU-hours to the token budget"),
    ("remaining_hours", "time left to the budget"),
)


_CELL_FORMATS = {
    "mfu": lambda v, s: f"{v:.1%} ({s['mfu_p10']:.1%}–{s['mfu_p90']:.1%})",
    "tokens_per_s": lambda v, s: f"{v:,.0f}",
    "tflops": lambda v, s: f"{v:.3g}",
    "step_time_s": lambda v, s: f"{v:.3f} s",
    "peak_mem_gib": lambda v, s: f"{v:.2f} GiB",
    "j_per_token": lambda v, s: f"{v:.3g} J",
    "tokens_so_far": lambda v, s: f"{v:,} ({v / s['token_budget']:.2e} of {s['token_budget']:.3g})",
    "budget_hours": lambda v, s: f"{v:,.1f} h ({v / 24:,.1f} days)",
    "remaining_hours": lambda v, s: f"{v:,.1f} h ({v / 24:,.1f} days)",
    "budget_gpu_hours": lambda v, s: f"{v:,.0f}",
}
"""How each row's value is written (from the value and the whole summary); others as str(value)."""


def fmt(key: str, s: dict) -> str:
    """The cell of row `key` for summary `s` (n/a where the run has no such data)."""
    value = s.get(key)
    if value is None:
        return "n/a"
    return _CELL_FORMATS[key](value, s) if key in _CELL_FORMATS else str(value)


def table_rows(summaries: list[dict]) -> list[list[str]]:
    """[label, cell of run 1, cell of run 2, ...] per row."""
    return [[label] + [fmt(key, s) for s in summaries] for key, label in ROWS]


def markdown_table(summaries: list[dict]) -> str:
    header = ["", *[s["run"].replace("|", "\\|") for s in summaries]]  # a folder may be named `a|b`
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(summaries)]
    return "\n".join(lines)


def config_differences(runs: list[Run], ignore: tuple[str, ...] = ("run_dir",)) -> list[tuple[str, list]]:
    """(dotted key, [value per run]) for every config key whose value is not the same in all runs."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    missing = object()
    diffs = []
    for key in keys:
        if key in ignore:
            continue
        vals = [f.get(key, missing) for f in flat]
        if any(v != vals[0] for v in vals[1:]):
            diffs.append((key, ["(absent)" if v is missing else v for v in vals]))
    return diffs
