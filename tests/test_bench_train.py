"""perf/bench_train.py runs end to end (a labelled CPU smoke case here; a short real case on a GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_runs_and_writes_its_table(tmp_path):
    pytest.importorskip("transformers", reason="the benchmark's peer")
    small = ["--layers", "1", "--seq-length", "256", "--micro-batch", "1", "--steps", "1", "--no-compile"] \
        if torch.cuda.is_available() else []
    result = subprocess.run([sys.executable, str(REPO / "perf" / "bench_train.py"), "--out", str(tmp_path), *small],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    text = next(tmp_path.glob("train-*.md")).read_text()
    if not torch.cuda.is_available():
        assert "NOT a measurement" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"megamath", "hf-eager"} <= set(rows)
    assert "error" not in rows["megamath"] and "error" not in rows["hf-eager"], text
    assert rows["megamath"].rstrip(" |").endswith("1.00")  # vs ours of ours
    float(rows["megamath"].split("|")[8])  # the planner's prediction for megamath's own step is there
    if torch.cuda.is_available():  # the planner against the measured peak
        assert "planner, micro-batch 1" in text and "within 10 %" in text, text
