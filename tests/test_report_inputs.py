"""`megamath report` on the run folders a user really holds after weeks: a metrics.jsonl with a rolled-back
attempt still in it, NaN losses, folder names with `$` or `|`, one folder given twice, two runs of one name.
Synthetic records, so each test takes a fraction of a second; test_profiling_report.py reads real runs."""
import json
from pathlib import Path

import pytest

from megamath.cli import main
from megamath.evaluation.config import EvaluationConfig
from megamath.evaluation.during_training import check_task_inputs
from megamath.report import figures
from megamath.report.notes import loss_spikes
from megamath.report.runs import load_run, load_runs
from megamath.report.summary import markdown_table, summarize


def record(step: int, loss: float = 4.0, attempt: int = 1) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * attempt, "skipped": False, "consumed_samples": 8 * step,
            "tokens_per_s": 1000.0, "tflops": 1.0, "mfu": None, "step_time_s": 1.0}


def write_run(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "config.yaml").write_text("data:\n  seq_length: 16\n")
    return directory


def test_a_step_logged_again_replaces_the_rolled_back_attempt(tmp_path):
    """Steps 1-30, then a start resumed from step 10's checkpoint that got to step 25 (a file no truncating writer
    cleaned up): the report sorted the 45 lines by step, so the loss zigzagged between the two attempts, 45 steps
    were counted and steps 26-30 of the abandoned attempt stayed. The later attempt wins from step 11 on."""
    first = [record(s, 5.0 - s / 10) for s in range(1, 31)]
    second = [record(s, 9.0 - s / 10, attempt=2) for s in range(11, 26)]
    run = load_run(write_run(tmp_path / "run", first + second))
    assert [r["step"] for r in run.records] == list(range(1, 26))
    assert [r["lr"] for r in run.records] == [1e-3] * 10 + [2e-3] * 15
    assert figures.series(run, "loss")[1][10:] == [9.0 - s / 10 for s in range(11, 26)]
    assert summarize(run, 0)["steps"] == 25 and summarize(run, 0)["tokens_so_far"] == 8 * 25 * 16


def test_a_nan_loss_does_not_hide_the_spikes_after_it(tmp_path):
    """json.loads reads NaN and Infinity; one in the window made the median NaN and no spike was found after it."""
    records = [record(s, 4.0 - s / 100) for s in range(1, 41)]
    records[11]["loss"], records[12]["loss"] = float("nan"), float("inf")
    records[24]["loss"] = 30.0
    run = load_run(write_run(tmp_path / "run", records))
    assert loss_spikes(run.records) == [25]


def test_a_folder_given_twice_is_refused_and_namesakes_are_told_apart(tmp_path, capsys):
    run = write_run(tmp_path / "a" / "train", [record(1)])
    assert main(["report", str(run), str(run)]) == 2
    assert capsys.readouterr().err == f"megamath report: error: {run} is given twice: give each run once\n"
    assert main(["report", str(run), str(tmp_path / "a" / ".." / "a" / "train") + "/"]) == 2
    assert "are the same run folder: give each run once" in capsys.readouterr().err
    # two copies of runs/llemma/train: the parent alone told them apart no better than the name
    other = write_run(tmp_path / "b" / "a" / "train", [record(1)])
    assert [r.name for r in load_runs([run, other])] == [f"{tmp_path.name}/a/train", "b/a/train"]


def test_names_with_dollars_and_bars_are_written_as_they_are(tmp_path, monkeypatch):
    """matplotlib reads text between two `$` as math: `r$\\alpha$` lost its dollars in the legends and
    `bad$\\frac{$x` stopped the report on a parse error; a `|` in a name split the Markdown table's header."""
    runs = load_runs([write_run(tmp_path / name, [record(s) for s in (1, 2)]) for name in (r"r$\alpha$",
                                                                                           r"bad$\frac{$x", "a|b")])
    drawn = []
    monkeypatch.setattr(figures, "to_uri", lambda fig: drawn.append(fig) or "data:")
    figures.loss_figure(runs)
    drawn[0].canvas.draw()  # where mathtext parses the labels
    legend = [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()]
    assert legend == [r"r\$\alpha\$: train", r"bad\$\frac{\$x: train", "a|b: train"]
    assert markdown_table([summarize(r, 0) for r in runs]).startswith(r"|  | r$\alpha$ | bad$\frac{$x | a\|b |")


def test_two_tasks_of_one_name_are_refused_before_the_run_starts(tmp_path):
    """Both logged eval/<task>/maj1: the second task's accuracy replaced the first's in metrics.jsonl."""
    config = EvaluationConfig(tasks=[{"name": "gsm8k", "data": "a.jsonl"}, {"name": "gsm8k", "data": "b.jsonl",
                                                                           "shots": 0}],
                              tokenizer_model=str(tmp_path / "never-read.model"))
    with pytest.raises(ValueError, match=r"^evaluation\.tasks\[1\]: a second gsm8k task; both would log "
                                         r"eval/gsm8k/maj1 to metrics\.jsonl"):
        check_task_inputs(config)
