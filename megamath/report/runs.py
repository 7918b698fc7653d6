"""A finished or running training run as the report reads it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megamath.model.safetensors_io import read_json
from megamath.training.config import read_yaml

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
RUN_INFO = "run_info.json"  # written by megamath.training.metrics.MetricsLogger
NUMBERS = ("consumed_samples", "loss", "lr", "grad_norm", "step_time_s", "step_time_min_s", "step_time_max_s",
           "tokens_per_s", "tflops", "mfu", "slowest_rank")  # a string there stopped the report on a TypeError


@dataclass
class Run:
    path: Path
    name: str
    """Label in tables and legends: the folder's name (with its parent when two runs share a name)."""
    records: list[dict]
    """metrics.jsonl, one dict per step, in step order (a resumed run's file is already one curve)."""
    config: dict = field(default_factory=dict)
    """config.yaml as plain data (empty when missing)."""
    info: dict = field(default_factory=dict)
    """run_info.json: world size, TP/DP sizes, device (empty for runs older than it)."""


def load_run(path: str | Path) -> Run:
    """Read RUN_DIR; a clear error when it is not a run folder or holds no step."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # often RUN_DIR/metrics.jsonl itself
        raise ValueError(f"{path} is a file, not a run folder: give the folder that holds {METRICS}")
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    metrics = path / METRICS
    if not metrics.is_file():
        raise FileNotFoundError(f"{path} has no {METRICS}: is it a megamath run folder (the run_dir of a config)?")
    records = []
    lines = metrics.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):  # only the last line may be torn (a run killed while writing it)
                raise ValueError(f"{metrics}:{number} is not valid JSON") from None
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"{metrics}:{number}: not a metrics record (an object with a step >= 1)")
        for key in NUMBERS:  # the fields the report does arithmetic on
            if record.get(key) is not None and (isinstance(record[key], bool)
                                                or not isinstance(record[key], (int, float))):
                raise ValueError(f"{metrics}:{number}: {key} must be a number, got {record[key]!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{metrics} holds no step yet")
    records.sort(key=lambda r: r["step"])
    config = read_yaml(path / CONFIG, "config") if (path / CONFIG).is_file() else {}
    if not isinstance(config or {}, dict):
        raise ValueError(f"{path / CONFIG} must hold a mapping of keys, got {type(config).__name__}")
    check_config(config or {}, path / CONFIG)
    info = read_json(path / RUN_INFO) if (path / RUN_INFO).is_file() else {}
    for key in ("world_size", "seq_length"):  # the counts the report multiplies by
        check_count(path / RUN_INFO, key, info.get(key))
    return Run(path, path.resolve().name, records, config or {}, info)


def check_config(config: dict, where: Path) -> None:
    """What the report reads of config.yaml: its sections mappings (or null, the defaults, as in training) and
    data.seq_length, which multiplies token counts, an integer."""
    for section in ("model", "data", "parallel"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ValueError(f"{where}: {section} must be a mapping of keys, got {config[section]!r}")
    check_count(where, "data.seq_length", (config.get("data") or {}).get("seq_length"))


def check_count(where: Path, key: str, value) -> None:
    """A count of the run (None: not recorded) must be an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:  # two runs named `train` in different folders
            run.name = f"{run.path.resolve().parent.name}/{run.path.resolve().name}"
    return runs
