"""The report's plots, drawn with matplotlib and returned as PNG data URIs for <img> tags.

PNG rather than SVG: a few tens of KB per figure whatever the number of steps, and nothing in it that
a browser would fetch (SVG output carries namespace URLs). Every function returns (title, uri) pairs,
none when the runs hold no data for that plot, so the page only shows what exists. Several runs share
one axis per quantity, one colour per run.
"""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from megamath.report.runs import Run  # noqa: E402
from megamath.training.phases import PHASES  # noqa: E402

HARDWARE = (("max_mem_gib", "peak allocated memory (GiB)"), ("max_reserved_gib", "peak reserved memory (GiB)"),
            ("power_w", "power (W)"), ("gpu_util", "GPU utilization (%)"), ("temp_c", "temperature (°C)"),
            ("sm_clock_mhz", "SM clock (MHz)"), ("j_per_token", "energy per token (J)"))
NOT_SCORES = ("phases", "val_loss", "test_loss")


def to_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def series(run: Run, key: str | tuple[str, ...]) -> tuple[list[int], list[float]]:
    """(steps, values) of a field, a nested `a.b` field, skipping records without a number. Names that may
    hold a dot themselves (validation sets, score fields) come as a tuple path: ("val_loss", "owm-v1.1")."""
    xs, ys = [], []
    for rec in run.records:
        value = rec
        for part in key if isinstance(key, tuple) else key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(rec["step"])
            ys.append(value)
    return xs, ys


def _label(*parts: str) -> str:
    """A legend entry from user-chosen names (run folders, validation sets, tasks): their `$` written as a literal
    dollar, since matplotlib reads text between two of them as math (a folder `lr$1e-3$` lost its dollars, one
    named `a$\\frac{$` stopped the report on a parse error)."""
    return "".join(parts).replace("$", r"\$")


def _colour(i: int):
    return plt.get_cmap("tab10")(i % 10)


def _axes(n: int, width: float = 10.0, height: float = 3.2):
    fig, axes = plt.subplots(n, 1, figsize=(width, height * n), squeeze=False, sharex=True)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return fig, list(axes[:, 0])


def held_out_series(run: Run, key: str, name: str) -> tuple[list[int], list[float]]:
    """series() of a held-out loss with skip_train's measurements (run.held_out) at the steps the records lack."""
    points = dict(zip(*series(run, (key, name))))
    for extra in run.held_out:
        value = extra.get(key, {}).get(name)
        if isinstance(value, (int, float)) and extra["step"] not in points:
            points[extra["step"]] = value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def loss_figure(runs: list[Run]) -> list[tuple[str, str]]:
    fig, (ax,) = _axes(1, height=4.0)
    for i, run in enumerate(runs):
        ax.plot(*series(run, "loss"), color=_colour(i), lw=1.2, label=_label(run.name, ": train"))
        for key, kind in (("val_loss", "validation"), ("test_loss", "test")):
            names = sorted({n for r in [*run.records, *run.held_out] for n in r.get(key, {})})
            for j, name in enumerate(names):
                style = (dict(ls=("--", ":", "-.")[j % 3], marker="o", ms=4) if kind == "validation" else
                         dict(ls="none", marker=("s", "^", "D")[j % 3], ms=6))  # taken at the last step
                ax.plot(*held_out_series(run, key, name), color=_colour(i), label=_label(run.name, f": {kind} ", name),
                        **style)
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return [("Training and validation loss", to_uri(fig))]


def lr_figure(runs: list[Run]) -> list[tuple[str, str]]:
    fig, (ax,) = _axes(1, height=2.6)
    for i, run in enumerate(runs):
        ax.plot(*series(run, "lr"), color=_colour(i), label=_label(run.name))
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=8)
    return [("Learning rate", to_uri(fig))]


def throughput_figure(runs: list[Run]) -> list[tuple[str, str]]:
    has_mfu = any(series(r, "mfu")[0] for r in runs)
    fig, (top, bottom) = _axes(2)
    for i, run in enumerate(runs):
        top.plot(*series(run, "tokens_per_s"), color=_colour(i), lw=1, label=_label(run.name))
        xs, ys = series(run, "mfu" if has_mfu else "tflops")
        bottom.plot(xs, [100 * y for y in ys] if has_mfu else ys, color=_colour(i), lw=1, label=_label(run.name))
    top.set_ylabel("tokens/s")
    bottom.set_ylabel("MFU (%)" if has_mfu else "TFLOP/s per device (no MFU: no GPU peak)")
    top.legend(fontsize=8)
    return [("Throughput: tokens/s and " + ("MFU" if has_mfu else "TFLOP/s"), to_uri(fig))]


def phase_figures(runs: list[Run]) -> list[tuple[str, str]]:
    out = []
    for run in runs:
        names = [p for p in PHASES if any(p in r.get("phases", {}) for r in run.records)]
        if not names:
            continue
        steps = [r["step"] for r in run.records if "phases" in r]
        stacks = [[r["phases"].get(p, 0.0) for r in run.records if "phases" in r] for p in names]
        fig, axes = _axes(2 if series(run, "step_time_max_s")[0] else 1)
        colours = [plt.get_cmap("tab10")(PHASES.index(p)) for p in names]  # a phase keeps its colour across runs
        axes[0].stackplot(steps, stacks, labels=names, colors=colours)
        axes[0].plot(*series(run, "step_time_s"), color="black", lw=0.8, label="step_time_s")
        axes[0].set_ylabel("seconds")
        axes[0].legend(fontsize=8, ncol=3)
        if len(axes) > 1:
            for key, label in (("step_time_max_s", "slowest rank"), ("step_time_min_s", "fastest rank")):
                axes[1].plot(*series(run, key), lw=1, label=label)
            axes[1].set_ylabel("step time across ranks (s)")
            axes[1].legend(fontsize=8)
        out.append((f"Where the step time goes: {run.name}", to_uri(fig)))
    return out


def hardware_figure(runs: list[Run]) -> list[tuple[str, str]]:
    present = [(k, label) for k, label in HARDWARE if any(series(r, k)[0] for r in runs)]
    if not present:
        return []
    fig, axes = _axes(len(present), height=2.4)
    for ax, (key, label) in zip(axes, present):
        for i, run in enumerate(runs):
            ax.plot(*series(run, key), color=_colour(i), lw=1, label=_label(run.name))
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=8)
    return [("Memory, power and utilization", to_uri(fig))]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def score_figure(runs: list[Run]) -> list[tuple[str, str]]:
    """Evaluation scores: any dict of numbers in the records other than phases and losses, and the flat
    `eval/<task>/maj<k>` numbers that evaluation during training logs."""
    keys = sorted({(k, n) for r in runs for rec in r.records for k, v in rec.items()
                   if isinstance(v, dict) and k not in NOT_SCORES for n, x in v.items() if _is_number(x)}
                  | {(k,) for r in runs for rec in r.records for k, v in rec.items()
                     if k.startswith("eval/") and _is_number(v)})
    if not keys:
        return []
    fig, (ax,) = _axes(1, height=3.5)
    for i, run in enumerate(runs):
        for j, key in enumerate(keys):
            xs, ys = series(run, key)
            if xs:
                ax.plot(xs, ys, color=_colour(i), ls=("-", "--", ":", "-.")[j % 4], marker="o", ms=4,
                        label=_label(run.name, ": ", ".".join(key)))
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    return [("Evaluation scores", to_uri(fig))]


def all_figures(runs: list[Run]) -> list[tuple[str, str]]:
    return (loss_figure(runs) + lr_figure(runs) + throughput_figure(runs) + phase_figures(runs)
            + hardware_figure(runs) + score_figure(runs))
