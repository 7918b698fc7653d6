"""perf/bench_train.py runs end to end (a labelled CPU smoke case here; a short real case on a GPU)."""
import contextlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disk_full import file_size_limit

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_runs_and_writes_its_table(tmp_path):
    pytest.importorskip("transformers", reason="the benchmark's peer")
    small = ["--layers", "1", "--seq-length", "256", "--micro-batch", "1", "--steps", "1", "--no-compile"] \
        if torch.cuda.is_available() else []
    result = subprocess.run([sys.executable, str(REPO / "perf" / "bench_train.py"), "--out", str(tmp_path), *small],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "megamath, micro-batch " in result.stdout and ": attention: " in result.stdout  # the choice is logged
    text = next(tmp_path.glob("train-*.md")).read_text()
    if not torch.cuda.is_available():
        assert "NOT a measurement" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"megamath", "hf-eager", "megamath-overlap"} <= set(rows)
    assert not any("error" in rows[name] for name in ("megamath", "hf-eager", "megamath-overlap")), text
    assert rows["megamath"].rstrip(" |").endswith("1.00")  # vs ours of ours
    float(rows["megamath"].split("|")[8])  # the planner's prediction for megamath's own step is there
    assert "## Kernels by kind: megamath, micro-batch " in text and "| gemm | " in text, text  # where it goes
    if torch.cuda.is_available():  # the planner against the measured peak
        assert "planner, micro-batch 1" in text and "within 10 %" in text, text


def load_bench(monkeypatch):
    """perf/bench_train.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("_bench_train", REPO / "perf" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def fake_step(*args, **kwargs):
    return lambda: 1.0


def test_a_failing_megamath_step_fails_the_benchmark(tmp_path, monkeypatch):
    """A peer may be absent or fail (its row says so); megamath's own step failing is the benchmark failing."""
    bench = load_bench(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(bench, "megamath_step", broken)
    monkeypatch.setattr(bench, "hf_step", fake_step)
    assert bench.main(["--out", str(tmp_path)]) == 1
    text = next(tmp_path.glob("train-*.md")).read_text()
    assert "| megamath | 2 | error: RuntimeError: CUDA error: an illegal memory access" in text, text
    monkeypatch.setattr(bench, "megamath_step", fake_step)
    assert bench.main(["--out", str(tmp_path)]) == 0


def test_rows_are_printed_and_written_as_they_are_measured(tmp_path, monkeypatch, capsys):
    """A run the GPU check's budget stops (a kill: no Python code runs after it) keeps what it measured."""
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "megamath_step", fake_step)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: stands in for the process being stopped here
    monkeypatch.setattr(bench, "hf_step", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(tmp_path)])
    text = next(tmp_path.glob("train-*.md")).read_text()
    assert "| megamath | 2 |" in text and "NOT a measurement" in text, text
    assert "| megamath | 2 |" in capsys.readouterr().out


def test_the_hugging_face_peer_trains_without_a_kv_cache(monkeypatch):
    """use_cache defaults to True in LlamaConfig: a training forward would build a DynamicCache holding every
    layer's keys and values and return it (extra outputs of the compiled graph), work no trainer does."""
    pytest.importorskip("transformers", reason="the benchmark's peer")
    bench = load_bench(monkeypatch)
    config = bench.model_config(bench.argparse.Namespace(layers=1, seq_length=16), gpu=False)
    out = bench.hf_model(config, torch.device("cpu"))(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None


def test_a_failing_profiler_costs_the_breakdown_not_the_row(tmp_path, monkeypatch):
    bench = load_bench(monkeypatch)

    def broken_profiler(*args):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(bench, "profile", broken_profiler)
    assert bench.main(["--out", str(tmp_path), "--no-compile"]) == 0
    text = next(tmp_path.glob("train-*.md")).read_text()
    assert "no breakdown: the profiler failed: RuntimeError: CUPTI unavailable" in text
    assert "| megamath | 2 | " in text and "error" not in text.split("| megamath | 2 | ")[1].splitlines()[0]


def test_a_full_disk_while_a_row_is_written_keeps_the_rows_written_before(tmp_path, monkeypatch):
    """The results file is rewritten after each row; it was rewritten in place, so a full disk (or a kill) in
    the rewrite cut the rows already measured."""
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "megamath_step", fake_step)
    written = []

    def disk_fills(*args, **kwargs):  # the peer runs after megamath's row was written; the disk fills meanwhile
        written.append(next(tmp_path.glob("train-*.md")).read_bytes())
        limit.enter_context(file_size_limit(len(written[0])))
        return fake_step()
    monkeypatch.setattr(bench, "hf_step", disk_fills)
    with contextlib.ExitStack() as limit, pytest.raises(OSError) as failed:
        bench.main(["--out", str(tmp_path)])
    assert next(tmp_path.glob("train-*.md")).read_bytes() == written[0] and b"| megamath | 2 |" in written[0]
    assert [p.name for p in tmp_path.iterdir()] == [f"train-{bench.datetime.date.today()}.md"]  # no temporary
    assert re.match(r"could not write .*train-.*File too large", str(failed.value)), failed.value  # names the file


def test_gradient_accumulation_steps_every_system_over_k_micro_batches(tmp_path, monkeypatch):
    """--grad-accum 3: megamath's step is the loop's train_step over 3 micro-batches of the micro-batch size, with
    the optimizer told so (grad_dtype auto then takes an fp32 buffer, which the matmuls accumulate into), and
    the Hugging Face peer runs 3 backward passes per optimizer step; tokens/s counts all of them."""
    pytest.importorskip("transformers", reason="the benchmark's peer")
    bench = load_bench(monkeypatch)
    seen = []
    train_step = bench.train_step

    def counting_train_step(model, optimizer, batch, *args):
        seen.append((len(batch), batch[0][0].shape, optimizer.grad_dtype, optimizer.gradient_accumulation_fusion))
        return train_step(model, optimizer, batch, *args)
    monkeypatch.setattr(bench, "train_step", counting_train_step)
    backward = torch.Tensor.backward
    passes = []
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: passes.append(1) or backward(self, *a, **k))
    assert bench.main(["--out", str(tmp_path), "--grad-accum", "3", "--breakdown-steps", "0"]) == 0
    assert set(seen) == {(3, torch.Size([2, 32]), "fp32", True)}
    text = (tmp_path / f"train-{bench.datetime.date.today()}-accum3.md").read_text()  # beside the default's file
    assert "3 micro-batch(es) per optimizer step" in text
    hf_steps = 1 + 2  # warm-up and timed steps on CPU
    assert len(passes) - 3 * len(seen) == 3 * hf_steps, (len(passes), len(seen))
    with pytest.raises(SystemExit):
        bench.main(["--grad-accum", "0"])


def test_a_run_off_the_default_case_is_named_so_and_never_replaces_its_table(monkeypatch):
    """train-DATE.md was written for any shape or flag, over the day's default table the planner reads."""
    import argparse

    bench = load_bench(monkeypatch)

    def args(**given):
        base = dict(layers=4, seq_length=4096, micro_batch=None, grad_accum=1, no_compile=False, peak_tflops=None)
        return argparse.Namespace(**{**base, **given})
    assert bench.result_suffix(args(), gpu=True) == ""
    assert bench.result_suffix(args(micro_batch=[1, 2]), gpu=True) == ""
    assert bench.result_suffix(args(layers=2, seq_length=2048, micro_batch=[4], no_compile=True, peak_tflops=700.0,
                                    grad_accum=3), gpu=True) == "-accum3-L2-S2048-mb4-nocompile-peak700"
    assert bench.result_suffix(args(seq_length=32, micro_batch=[2]), gpu=False) == ""  # the CPU smoke case
