"""The GPU check's small training case: writes a counting corpus and its train.yaml into a folder, and
afterwards checks the run's metrics (every step logged, every loss finite, the loss fallen, the step timed)
and times the hardware readings each step's record makes.

    python perf/gpu_train_case.py DIR && megamath train --config DIR/train.yaml \\
        && python perf/gpu_train_case.py --check DIR
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from megamath.data.indexed_dataset_writer import IndexedDatasetWriter

STEPS = 20
PERIOD = 64  # the corpus counts modulo 64: a working trainer soon predicts only those 64 of the 4096 tokens
MIN_DROP = 1.0  # nats, last step against the first (~ln 4096 = 8.3; ln 64 = 4.2 once the 64 are learnt)


def write_case(root: Path) -> None:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(f"{root}/counting", np.uint16) as writer:
        for _ in range(400):
            start, n = int(rng.integers(0, PERIOD)), int(rng.integers(64, 2048))
            writer.add_document((np.arange(start, start + n) % PERIOD).astype(np.uint16))
    config = {"model": {"vocab_size": 4096, "hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2,
                        "ffn_hidden_size": 1408, "max_seq_length": 1024},
              "data": {"data_path": [1, f"{root}/counting"], "seq_length": 1024},
              "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 5, "decay_steps": STEPS},
              "checkpoint": {"save_every": 10}, "run_dir": f"{root}/run", "micro_batch_size": 4,
              "train_steps": STEPS, "log_every": 5}
    with open(root / "train.yaml", "w") as f:
        yaml.safe_dump(config, f)


def check_run(root: Path) -> str:
    """One line describing the run; raises ValueError on what a working trainer never writes."""
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    if [r["step"] for r in steps] != list(range(1, STEPS + 1)):
        raise ValueError(f"metrics.jsonl has steps {[r['step'] for r in steps]}, not 1..{STEPS}")
    losses = [r["loss"] for r in steps]
    if any(loss is None or not math.isfinite(loss) for loss in losses):
        raise ValueError(f"a non-finite loss: {losses}")
    if losses[-1] > losses[0] - MIN_DROP:
        raise ValueError(f"the loss did not fall by {MIN_DROP}: {losses[0]:.3f} -> {losses[-1]:.3f}")
    if not all(r["step_time_s"] > 0 and "optimizer" in r["phases"] for r in steps):
        raise ValueError("a step without its time or its optimizer phase")
    last = steps[-1]
    mfu = "-" if last.get("mfu") is None else f"{100 * last['mfu']:.1f} %"
    log_ms = 1000 * statistics.median(r["phases"].get("log", 0.0) for r in steps[1:])  # (the first has none)
    return (f"megamath train: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps; last step "
            f"{1000 * last['step_time_s']:.1f} ms, {last['tokens_per_s']:.0f} tokens/s, MFU {mfu}; "
            f"writing a step's record (the `log` phase) {log_ms:.1f} ms per step, median")


def reading_times(probe=None, repeats: int = 20) -> str:
    """Each hardware reading a step's record makes (megamath.training.hardware.HardwareProbe), timed here: the
    median ms of `repeats` calls. On an H200 the `log` phase of this case's steps took 3.4-13 ms of 22-30;
    this says which reading that is. `probe`: a HardwareProbe (default: one of this machine's GPU)."""
    import torch

    from megamath.training.hardware import HardwareProbe

    if probe is None:
        if not torch.cuda.is_available():
            return "hardware readings: no CUDA device here"
        probe = HardwareProbe(torch.device("cuda"))
    calls = dict(probe.readers())
    if probe.handle is not None:
        calls["energy"] = probe.energy_mj
    if probe.device.type == "cuda":
        calls["torch.cuda.memory_stats"] = lambda: torch.cuda.memory_stats(probe.device)
    calls["the whole read()"] = probe.read
    parts = []
    for name, call in calls.items():
        times = []
        try:
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
        except Exception as err:  # a reading this board does not give: the trainer skips it too
            parts.append(f"{name} fails ({type(err).__name__})")
            continue
        parts.append(f"{name} {1000 * statistics.median(times):.3f}")
    return f"hardware readings, median ms of {repeats} calls: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--check", action="store_true", help="check the finished run's metrics instead")
    args = parser.parse_args(argv)
    if not args.check:
        write_case(args.dir)
        return 0
    try:
        print(check_run(args.dir))
    except (ValueError, OSError, KeyError) as err:
        print(f"FAILED: {err}")
        return 1
    print(reading_times())
    return 0


if __name__ == "__main__":
    sys.exit(main())
