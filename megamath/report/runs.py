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
HELD_OUT = "held_out_step*.json"  # written by megamath.training.held_out (skip_train)
NUMBERS = ("consumed_samples", "loss", "lr", "grad_norm", "step_time_s", "step_time_min_s", "step_time_max_s",
           "tokens_per_s", "tflops", "mfu", "slowest_rank")  # a string there stopped the report on a TypeError


@dataclass
class Run:
    path: Path
    name: str
    """Label in tables and legends: the folder's name (with its parents when two runs share a name)."""
    records: list[dict]
    """metrics.jsonl, one dict per step, in step order: a step logged again (a start resumed from an earlier
    checkpoint, in a file no truncating writer cleaned up) replaces it and every later step, as it does in training."""
    config: dict = field(default_factory=dict)
    """config.yaml as plain data (empty when missing)."""
    info: dict = field(default_factory=dict)
    """run_info.json: world size, TP/DP sizes, device (empty for runs older than it)."""
    held_out: list[dict] = field(default_factory=list)
    """RUN_DIR/held_out_step*.json in step order: what `skip_train` measured of the run's starting points
    ({step, val_loss, test_loss}), e.g. the losses before step 1."""


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
        while records and records[-1]["step"] >= step:  # a redone step: the earlier attempt's steps from it on
            records.pop()  # were rolled back (MetricsLogger truncates them; older files still hold them)
        records.append(record)
    if not records:
        raise ValueError(f"{metrics} holds no step yet")
    config = read_yaml(path / CONFIG, "config") if (path / CONFIG).is_file() else {}
    if not isinstance(config or {}, dict):
        raise ValueError(f"{path / CONFIG} must hold a mapping of keys, got {type(config).__name__}")
    check_config(config or {}, path / CONFIG)
    info = read_json(path / RUN_INFO) if (path / RUN_INFO).is_file() else {}
    for key in ("world_size", "seq_length"):  # the counts the report multiplies by
        check_count(path / RUN_INFO, key, info.get(key))
    held_out = sorted((read_held_out(p) for p in path.glob(HELD_OUT)), key=lambda h: h["step"])
    return Run(path, path.resolve().name, records, config or {}, info, held_out)


def read_held_out(path: Path) -> dict:
    """One skip_train record: its step and its {set: loss or null} mappings, checked."""
    record = read_json(path)
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: not a held-out record (an object with a step >= 0)")
    for key in ("val_loss", "test_loss"):
        losses = record.get(key, {})
        numbers = isinstance(losses, dict) and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in losses.values())
        if not numbers:
            raise ValueError(f"{path}: {key} must map each set to a loss or null, got {losses!r}")
    return record


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
    """The runs, each once, named by as many trailing folders of their path as tell them apart."""
    runs = [load_run(p) for p in paths]
    seen = {}
    for run in runs:
        where = run.path.resolve()
        if where in seen:  # two columns, legends and config columns that could not be told apart
            same = f"{run.path} is given twice" if str(run.path) == str(seen[where]) else \
                f"{seen[where]} and {run.path} are the same run folder"
            raise ValueError(f"{same}: give each run once")
        seen[where] = run.path
    depth = [1] * len(runs)
    while True:
        names = [str(Path(*r.path.resolve().parts[-d:])) for r, d in zip(runs, depth)]
        shared = [i for i, name in enumerate(names) if names.count(name) > 1]
        if not shared:  # two runs named `train` in different folders: `a/train`, `b/train`, and so on up
            break
        for i in shared:
            depth[i] += 1
    for run, name in zip(runs, names):
        run.name = name
    return runs
