"""The compute efficiency a plan assumes: this project's own measured training step where there is one.

perf/bench_train.py writes `perf/results/train-YYYY-MM-DD.md` when it runs on a GPU: a title naming the
device and a table with megamath's MFU on the benchmark's shape (Code Llama 7B's width, one GPU, so no
communication: its MFU is the compute efficiency that step_time.py multiplies the peak by, somewhat low:
the benchmark's step also holds an AdamW step over its whole unsharded model, which by step_time.py's own
models is ~10 ms beside ~50 ms of matmuls per 4,096 tokens on an H100, while a planned step amortises it
over DP and accumulation and charges it on its own line; so a measured efficiency errs slow). The
newest such file measured on the planned GPU gives the efficiency (the median of megamath's rows); without
one the GPU's stated default is used (hardware.py). Every plan says which it used, and --efficiency
overrides both.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from megamath.planning.hardware import GPU

RESULTS_DIR = Path(__file__).resolve().parents[2] / "perf" / "results"
"""perf/results/ of the checkout this package runs from."""
DEVICE_NAMES = {"a100-40gb": ("A100", "40GB"), "a100-80gb": ("A100", "80GB"), "h100-80gb": ("H100",),
                "h200": ("H200",)}
"""Words that torch.cuda.get_device_name() of each planned GPU contains (e.g. "NVIDIA A100-SXM4-40GB")."""
OTHER_PARTS = ("PCIe", "NVL", "GH200")
"""Words of the same chips' other boards: the planned GPUs are the SXM parts (hardware.py's memory, HBM and
NVLink figures), and a PCIe or NVL card (lower power, clocks and peak) or a Grace Hopper superchip reaches
another fraction of its peak, so a step measured on one is not a measurement on them."""
_TITLE = re.compile(r"^# Training step, (\d{4}-\d{2}-\d{2}): (.+)$")
_CASE = re.compile(r"model: L (\d+), h (\d+),.* S (\d+);.* peak ([\d.]+) TFLOP/s")
DEFAULT_CASE = (4, 4096, 4096)
"""(layers, hidden, sequence length) of bench_train's default case: the shape whose MFU stands for a plan's."""


@dataclass(frozen=True)
class Efficiency:
    value: float
    """Fraction of the dense bf16 peak."""
    source: str
    """Where it comes from, for the plan's assumptions line."""


def _megamath_mfus(text: str, path: Path) -> list[float]:
    """MFU of every megamath row of a bench_train table (the sixth column, e.g. "52.1 %")."""
    mfus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 7 and cells[1] == "megamath" and cells[6].endswith("%"):
            try:
                mfus.append(float(cells[6].rstrip(" %")) / 100)
            except ValueError:  # a hand-edited table: say which file, not float()'s bare complaint
                raise ValueError(f"{path}: megamath's MFU {cells[6]!r} is not a number; correct or remove the "
                                 "file, or give --efficiency") from None
    return mfus


def measured_efficiency(gpu: GPU, results_dir: Path = RESULTS_DIR) -> Efficiency | None:
    """megamath's measured MFU on this GPU from the newest bench_train result, or None when there is none."""
    words = DEVICE_NAMES.get(gpu.name, ())
    for path in sorted(Path(results_dir).glob("train-*.md"), reverse=True):  # names sort by date
        text = path.read_text(errors="replace")
        title = _TITLE.match(text.splitlines()[0] if text else "")
        device = title.group(2).lower() if title else ""
        if not title or not words or not all(w.lower() in device for w in words) \
                or any(w.lower() in device for w in OTHER_PARTS):
            continue
        case = _CASE.search(text)  # another shape, or MFU over another peak (--peak-tflops), is no measurement of it
        if not case or tuple(map(int, case.groups()[:3])) != DEFAULT_CASE or float(case.group(4)) != gpu.peak_tflops:
            continue
        mfus = [m for m in _megamath_mfus(text, path) if 0 < m <= 1]
        if mfus:
            return Efficiency(statistics.median(mfus), f"measured: megamath's MFU in {path.name} on {title.group(2)}")
    return None


def compute_efficiency(gpu: GPU, override: float | None = None, results_dir: Path = RESULTS_DIR) -> Efficiency:
    """--efficiency if given, else the measured efficiency on this GPU, else its stated default."""
    if override is not None:
        return Efficiency(override, "--efficiency")
    return measured_efficiency(gpu, results_dir) or Efficiency(gpu.efficiency, "stated default: no measured "
                                                                                "training step on this GPU yet")
