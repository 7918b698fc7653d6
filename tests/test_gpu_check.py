"""perf/gpu_check.sh without a GPU: its bash parses, what it runs exists and takes the flags it is given, and
the short run fits the one command a GPU session gets (600 s): one budget shared by every step, a `CUT:` line
naming a step the budget stopped, and the final status line written whatever was cut.

The script runs here with a stand-in `python` (PYTHON=...) that records each call and sleeps on the heavy
ones (the training benchmark's stand-in, a real Python, prints a row first, as bench_train does, without
flushing), so the budget arithmetic and the log are exercised for real at a small GPU_CHECK_BUDGET.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "perf" / "gpu_check.sh"
ALL_PARTS = "tests train train_bench kernels resources"

STUB = """#!/usr/bin/env bash
# Stands in for python: records its arguments, sleeps on the heavy steps (pytest and the benchmarks).
printf '%s\\n' "$*" >> "$STUB_LOG"
case "$*" in
    *"pip install --no-build-isolation"*) printf 'CUDA_HOME=%s\\n' "${CUDA_HOME-(unset)}" >> "$STUB_LOG";;
esac
case "$*" in
    *bench_train.py*) exec "$REAL_PYTHON" -c "import time; print('| megamath | 1 | a row |'); time.sleep($STUB_SLEEP)";;
    "-m pytest "*|*bench_kernels.py*) exec sleep "${STUB_SLEEP:-0}";;
esac
exit 0
"""


def run_check(tmp_path: Path, parts: str | None = None, sleep: float = 0, budget: int | None = None,
              timeout: float = 60, env_extra: dict[str, str | None] | None = None
              ) -> tuple[subprocess.CompletedProcess, list[str], float]:
    """Run gpu_check.sh with the stand-in python; (process, the stand-in's calls, wall seconds). env_extra: variables
    to set, or to remove (None)."""
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    knobs = ("PARTS", "TESTS", "BENCH_ARGS", "TRAIN_BENCH_ARGS", "GPU_CHECK_BUDGET", "TEST_TIMEOUT",
             "TRAIN_BENCH_TIMEOUT", "BENCH_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in knobs + ("PYTHONUNBUFFERED",)}
    env.update(PYTHON=str(stub), REAL_PYTHON=sys.executable, OUT=str(tmp_path / "out"), STUB_LOG=str(log), STUB_SLEEP=str(sleep),
               WHEELS_DIR=str(tmp_path / "no-wheels"))
    if parts is not None:
        env["PARTS"] = parts
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    for key, value in (env_extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    start = time.monotonic()
    # Its own process group, so that a run that overstays is stopped whole (the stand-in's sleeps included).
    with subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls, time.monotonic() - start


def test_the_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_test_file_pattern_it_names_matches_a_file():
    text = SCRIPT.read_text()
    patterns = set(re.findall(r"tests/test_[\w*]+\.py", text))
    assert "tests/test_gpu_trainer.py" in patterns and "tests/test_attention_choice.py" in patterns
    for pattern in patterns:
        assert glob.glob(str(REPO / pattern)), f"gpu_check.sh names {pattern}, which matches no file"


class _Parsed(Exception):
    """Raised by the patched parse_args once the arguments parsed: the script's work is not run."""


def parse_with_the_script(script: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Parse argv with the perf script's own argparse (its main(argv) up to parse_args, nothing after)."""
    path = REPO / script
    assert path.is_file(), f"gpu_check.sh runs {script}, which does not exist"
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed) as parsed:
        module.main(argv)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    return parsed.value.args[0]


@pytest.mark.parametrize("parts", [None, ALL_PARTS], ids=["short", "all-parts"])
def test_what_it_runs_exists_and_parses_the_flags_it_passes(tmp_path, monkeypatch, parts):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is what bounds each step")
    result, calls, _ = run_check(tmp_path, parts=parts)
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = {}
    for call in calls:
        try:
            argv = shlex.split(call)
        except ValueError:  # a line inside a `python -c` program
            continue
        if argv[:2] == ["-m", "pytest"]:
            files = [a for a in argv[2:] if a.endswith(".py")]
            assert files and all((REPO / f).is_file() for f in files), call
            scripts["pytest"] = files
        elif argv and argv[0].startswith("perf/") and argv[0].endswith(".py"):
            scripts[argv[0]] = argv[1:]
        elif argv[:3] == ["-m", "megamath.cli", "train"]:
            scripts["megamath train"] = argv[3:]
    expected = {"pytest", "perf/bench_train.py", "perf/bench_kernels.py", "perf/gpu_train_case.py", "megamath train"}
    if parts == ALL_PARTS:
        expected |= {"perf/kernel_resources.py"}
    else:
        assert scripts["pytest"] == ["tests/test_gpu_trainer.py", "tests/test_sum_of_squares.py",
                                     "tests/test_attention_choice.py"]
        assert "--ops" in scripts["perf/bench_kernels.py"]
    assert set(scripts) == expected, calls
    for script in ("perf/bench_train.py", "perf/bench_kernels.py", "perf/kernel_resources.py"):
        if script in scripts:
            args = parse_with_the_script(script, scripts[script], monkeypatch)
            assert str(args.out) == str(tmp_path / "out")  # results go to $OUT, which comes back
    if "perf/bench_kernels.py" in scripts and parts is None:
        assert parse_with_the_script("perf/bench_kernels.py", scripts["perf/bench_kernels.py"],
                                     monkeypatch).ops == "flash_attention"
    if "megamath train" in scripts:
        from megamath.cli import build_parser
        assert build_parser().parse_args(["train", *scripts["megamath train"]]).config
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "CUT:" not in log and log.rstrip().splitlines()[-1].startswith("=== done: status 0"), log


def test_the_budget_bounds_the_whole_run_and_names_what_it_cut(tmp_path):
    """Heavy steps that would never end: the run still stops within its budget, each stopped step says so,
    and the final status line (non-zero) is the log's last line."""
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is what bounds each step")
    budget = 20  # the training benchmark's share (22 %) must outlast a Python start on a loaded 2-core machine
    result, calls, wall = run_check(tmp_path, sleep=100, budget=budget, timeout=budget + 30)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert wall <= budget + 2, (wall, log)
    assert result.returncode != 0, log
    cut = [line for line in log.splitlines() if line.startswith("CUT:")]
    assert any("tests" in line for line in cut) and any("training benchmark" in line for line in cut), log
    assert any("benchmark" in line and "training" not in line for line in cut), log  # attention: cut or not run
    last = log.rstrip().splitlines()[-1]
    assert last.startswith("=== done: status ") and "cut:" in last, last
    assert any("bench_train.py" in call for call in calls), calls  # the later steps kept a share of the budget
    assert "| megamath | 1 | a row |" in log, log  # what a stopped Python step printed is in the log


def test_the_build_finds_cuda_through_an_nvcc_wrapper(tmp_path):
    """With CUDA_HOME unset, torch's build takes the folder above the first nvcc on PATH as CUDA's home; where
    that nvcc is a wrapper script, the folder has no headers and the whole install failed ("cuda_runtime.h: No
    such file", torch 2.11 with a shim nvcc), and every later step with it. The check asks nvcc where it runs
    from; a CUDA_HOME already set, or a PATH nvcc beside its headers, is left alone."""
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is what bounds each step")
    cuda = tmp_path / "toolkit"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "include" / "cuda_runtime.h").touch()
    shim = tmp_path / "shim" / "bin"  # its parent holds no include/
    shim.mkdir(parents=True)
    (shim / "nvcc").write_text("#!/usr/bin/env bash\n"  # what nvcc --dryrun prints first (to stderr)
                               f'case "$*" in *--dryrun*) echo "#$ _HERE_={cuda}/bin" >&2;; esac\n')
    (shim / "nvcc").chmod(0o755)
    path = f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"

    def cuda_home(env_extra):
        run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"  # a fresh log for each run
        run.mkdir()
        result, calls, _ = run_check(run, parts="train", env_extra=env_extra)
        assert result.returncode == 0, result.stdout + result.stderr
        return next(call for call in calls if call.startswith("CUDA_HOME="))

    assert cuda_home({"PATH": path, "CUDA_HOME": None}) == f"CUDA_HOME={cuda.resolve()}"
    assert cuda_home({"PATH": path, "CUDA_HOME": "/chosen"}) == "CUDA_HOME=/chosen"
    (shim.parent / "include").mkdir()
    (shim.parent / "include" / "cuda_runtime.h").touch()  # the nvcc on PATH sits beside its headers
    assert cuda_home({"PATH": path, "CUDA_HOME": None}) == "CUDA_HOME=(unset)"


def test_the_default_budget_fits_one_command_of_a_gpu_session():
    text = SCRIPT.read_text()
    budget = re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET:-(\d+)\}", text)
    assert budget and int(budget.group(1)) <= 540, "the short run must end well inside a 600 s command"
    assert "export PYTHONUNBUFFERED=1" in text  # a step stopped by the budget keeps the lines it printed


def test_the_tests_run_without_pytest_xdist():
    """A GPU machine's image has no pytest-xdist: the script then runs pytest plain, and the suite's conftest
    must load there (an xdist hook it did not mark optional stopped every test with an internal error)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                             "tests/test_readme.py"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def _case_module():
    spec = importlib.util.spec_from_file_location("gpu_train_case", REPO / "perf" / "gpu_train_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_case_is_a_valid_config_and_its_check_can_fail(tmp_path):
    """The case `megamath train` runs on the GPU loads as a config; the check after it passes a run whose loss
    fell and fails a run whose loss stalled, went non-finite or lost a step."""
    from megamath.training.config import load_config
    case = _case_module()
    case.write_case(tmp_path)
    config = load_config(tmp_path / "train.yaml")
    assert config.train_steps == case.STEPS
    (tmp_path / "run").mkdir()

    def run_with(losses):
        lines = [json.dumps({"step": i + 1, "loss": loss, "step_time_s": 0.01, "tokens_per_s": 1e5, "mfu": 0.3,
                             "phases": {"forward": 0.004, "optimizer": 0.002, **({"log": 0.003} if i else {})}})
                 for i, loss in enumerate(losses)]
        (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return case.main(["--check", str(tmp_path)])

    falling = [8.3 - 0.4 * i for i in range(case.STEPS)]
    assert run_with(falling) == 0
    assert case.check_run(tmp_path).endswith("writing a step's record (the `log` phase) 3.0 ms per step, median")
    assert run_with([8.3] * case.STEPS) == 1
    assert run_with(falling[:-1] + [None]) == 1
    assert run_with(falling[:-1]) == 1


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.4.0rc1", True), ("3.6.0", "2.3.5", False),
    ("3.8.0", "2.4.6", False), ("3.10.1", "2.5.0", False), ("3.6.0+git1a2b", "2.2.6", False),
])
def test_an_interpreter_that_cannot_run_with_this_numpy_is_refused_in_one_line(triton_version, numpy_version,
                                                                                refused):
    """The GPU image's Triton 3.6 fails ~120 interpreted tests under numpy 2.4 with an error naming neither;
    the conftest stops the session first, saying what to install."""
    from conftest import interpreter_refusal

    message = interpreter_refusal(triton_version, numpy_version)
    assert (message is not None) == refused
    if refused:
        assert message == (f"Triton {triton_version}'s CPU interpreter cannot run with numpy {numpy_version}: "
                           "install numpy<2.4 (or Triton 3.8 or later)")


def test_the_hardware_readings_are_timed_one_by_one():
    """gpu_train_case times each reading a step's record makes (a stand-in NVML here: one reading slow, one
    failing as a board without it fails); without a CUDA device it says so instead."""
    import torch

    from megamath.training.hardware import HardwareProbe

    class NVML:
        NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

        def nvmlDeviceGetUtilizationRates(self, handle):
            return type("Rates", (), {"gpu": 50})()

        def nvmlDeviceGetMemoryInfo(self, handle):
            return type("Memory", (), {"used": 2**30})()

        def nvmlDeviceGetPowerUsage(self, handle):
            time.sleep(0.004)  # milliwatts, slowly
            return 300_000

        def nvmlDeviceGetTemperature(self, handle, sensor):
            raise RuntimeError("not on this board")

        def nvmlDeviceGetClockInfo(self, handle, clock):
            return 1980

        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            return 1000

    case = _case_module()
    probe = HardwareProbe(torch.device("cpu"))
    probe.handle, probe.nvml = "board 0", NVML()
    assert {key: read() for key, read in probe.readers().items() if key != "temp_c"} == {
        "gpu_util": 50, "gpu_mem_used_gib": 1.0, "power_w": 300.0, "sm_clock_mhz": 1980}
    line = case.reading_times(probe, repeats=3)
    assert line.startswith("hardware readings, median ms of 3 calls: gpu_util ")
    assert "temp_c fails (RuntimeError)" in line and ", energy " in line
    assert line.rsplit(", ", 1)[1].startswith("the whole read() ")  # (on a CPU device: no readings, nothing to wait)
    power = float(line.split("power_w ")[1].split(",")[0])
    assert power >= 4.0
    if not torch.cuda.is_available():
        assert case.reading_times() == "hardware readings: no CUDA device here"
