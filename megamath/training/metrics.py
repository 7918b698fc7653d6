"""What a run reports: one JSON object per step in RUN_DIR/metrics.jsonl, console lines, a throughput summary.

Throughput in Megatron's terms: tokens/s of the whole job, model TFLOP/s per device from
`ModelConfig.flops_per_token` (activation recomputation not counted, so this is MFU, not HFU), and MFU
against the device's dense bf16 peak. On CPUs there is no meaningful peak and MFU is null. GPU memory
comes from torch; utilization, power, energy, temperature and clocks from NVML (hardware.py). Each
step also carries its phase times (phases.py). Only global rank 0 writes files. TensorBoard
(tensorboard_log.py) and Weights & Biases (wandb_log.py) are optional sinks of the same records.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megamath.atomic_io import naming_write_errors, write_text_atomically
from megamath.parallel.mappings import all_gather_list
from megamath.parallel.state import ParallelState
from megamath.training.hardware import HardwareProbe
from megamath.training.phases import NOT_TRAINING, StepTiming
from megamath.training.wandb_log import WandbConfig, WandbSink, import_wandb

RUN_INFO = "run_info.json"
CONFIG_FILE = "config.yaml"
LAYOUT_KEYS = ("world_size", "tp_size", "dp_size", "device_name")
"""run_info.json's fields that make a layout: a start that changes one begins a new `layout_since_step`."""

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name().
# Most specific first: an "H100 PCIe" or an "H200 NVL" must not match the SXM entry.
PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` when given (the config's metrics.peak_tflops), else
    the table's entry for the GPU's name, else None (CPU, or a GPU missing from the table)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "MIG" in name:  # a slice of the GPU ("... MIG 1g.10gb") has a fraction of its SMs: not the chip's peak
        return None
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: non-finite values are written as null (the record's `skipped` says why)."""
    return x if math.isfinite(x) else None


@dataclass
class RunDescription:
    """What a start's records came from: RUN_DIR/config.yaml (the config as text) and run_info.json.

    The logger writes both just before the start's first record reaches metrics.jsonl, so a start that
    trains no step (refused on resume, started with no step left, out of memory at its first step) leaves
    the run described as it ran. run_info.json's `layout_since_step` is the first step run on this layout
    (devices, TP and DP sizes): steps before it ran on another one, and a report's throughput is that of
    the steps from it on.
    """

    config_yaml: str
    info: dict


def layout_since_step(previous: dict, info: dict, first_step: int) -> int:
    """The first step of the layout `info` describes: kept from the previous start's run_info.json when
    that start ran the same layout and began before this one, else this start's first step (also when no
    run_info.json says what ran before: those steps' layout is unknown)."""
    since = previous.get("layout_since_step", 1)
    same = all(previous.get(k) == info.get(k) for k in LAYOUT_KEYS)
    return since if same and isinstance(since, int) and since <= first_step else first_step


def _read_info(run_dir: Path) -> dict:
    """The previous start's run_info.json, or {} (missing or unreadable: it is about to be replaced)."""
    try:
        info = json.loads((run_dir / RUN_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class MetricsLogger:
    """Rank 0's metrics.jsonl, console lines and progress bar; files are written by rank 0 only.

    A step goes in as `record` (the step's values, every rank) then `write(rec, timing)`, which adds the
    timing fields once the step's timing can be read: at once on CPU, one step later on GPU (see
    phases.py). Every rank must call `write` for every step in the same order, since with several ranks
    it gathers the step times (a small collective), and `summary()` before `close()`.

    Timing fields: `step_time_s` is the whole step, `phases` its parts (`log` and `checkpoint` are the
    previous step's record and save: a record is written before its checkpoint is published); tokens/s,
    TFLOP/s and MFU count the training work only (evaluation, checkpoint and profiler time left out, as
    Megatron leaves out evaluation and saves). With several ranks: `step_time_max_s`, `step_time_min_s`
    and the `slowest_rank`.
    """

    def __init__(self, run_dir: Path, state: ParallelState, flops_per_token: int, tokens_per_step: int,
                 total_steps: int, first_step: int, log_every: int, tensorboard_dir: Path | None = None,
                 description: RunDescription | None = None, wandb: WandbConfig | None = None,
                 run_config: dict | None = None, peak_override: float | None = None) -> None:
        self.enabled = state.rank == 0
        self.world_group = state.world_group  # the per-step gather of step times and energy
        # Every rank checks the package, so that a missing one fails the whole job at once; rank 0 loads it.
        wandb_module = import_wandb(wandb, load=self.enabled) if wandb is not None else None
        self.wandb = None
        self.device, self.flops_per_token, self.world_size = state.device, flops_per_token, state.world_size
        self.tokens_per_step, self.log_every = tokens_per_step, log_every
        self.peak = peak_tflops(state.device, peak_override)  # MFU's denominator, TFLOP/s
        self.timed: list[float] = []  # training times of steps, for the summary
        self.pending: list[tuple[dict, StepTiming]] = []  # records whose timing is not read yet
        self.hardware = HardwareProbe(state.device)
        self.tensorboard = None
        if not self.enabled:
            return
        self.run_dir, self.description = Path(run_dir), description
        if description is not None:  # (a copy: the caller's description stays as given)
            since = layout_since_step(_read_info(self.run_dir), description.info, first_step)
            self.description = RunDescription(description.config_yaml, {**description.info, "layout_since_step": since})
        if tensorboard_dir is not None:  # first: a folder refused leaves metrics.jsonl as it was
            from megamath.training.tensorboard_log import TensorBoardLog

            self.tensorboard = TensorBoardLog(Path(tensorboard_dir), first_step, self.run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        _truncate_after(self.path, first_step - 1)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its lines
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=first_step - 1, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)
        if wandb_module is not None:
            self.wandb = WandbSink(wandb_module, wandb, run_dir, run_config)

    def record(self, step: int, loss: float, lr: float, grad_norm: float, skipped: bool,
               consumed_samples: int) -> dict:
        """The step's values (every rank builds it); `write` adds the timing fields."""
        rec = {"step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
               "skipped": skipped, "consumed_samples": consumed_samples}
        if self.device.type == "cuda":
            rec["mem_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return rec

    def write(self, rec: dict, timing: StepTiming, flush: bool = False) -> None:
        """Queue the step; steps whose timing is readable are completed and (rank 0) written.

        On GPU the newest step waits for the next call (its events are read a step late); the rule is the
        same on every rank, so their collectives pair up. `flush` writes it now (waiting for its events):
        the loop asks for that before a checkpoint, whose step must be in metrics.jsonl first.
        """
        self.pending.append((rec, timing))
        self._flush(keep_last=self.device.type == "cuda" and not flush)

    def _flush(self, keep_last: bool, gather: bool = True) -> None:
        while len(self.pending) > (1 if keep_last else 0):
            rec, timing = self.pending.pop(0)
            self._complete(rec, timing, gather)
            if self.enabled:
                if self.description is not None:  # this start's first record: it describes the run from now on
                    write_text_atomically(self.run_dir / CONFIG_FILE, self.description.config_yaml)
                    write_text_atomically(self.run_dir / RUN_INFO, json.dumps(self.description.info, indent=1) + "\n")
                    self.description = None
                with naming_write_errors(self.path, "the steps logged before are kept"):  # a resume drops a torn line
                    self.file.write(json.dumps(rec) + "\n")
                if self.tensorboard is not None:
                    self.tensorboard.write(rec)
                if self.wandb is not None:
                    self.wandb.log(rec)
                self.bar.update(1)
                loss = "nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
                self.bar.set_postfix_str(f"loss {loss} lr {rec['lr']:.2e}", refresh=False)
                if rec["step"] % self.log_every == 0 or "val_loss" in rec or "test_loss" in rec:
                    self.say(format_record(rec))

    def _complete(self, rec: dict, timing: StepTiming, gather: bool) -> None:
        """Add the timing, throughput and hardware fields to `rec`."""
        step_time, phases = timing.resolve()
        train_time = max(step_time - sum(phases.get(name, 0.0) for name in NOT_TRAINING), 1e-12)
        tokens_per_s = self.tokens_per_step / train_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12  # per device
        rec.update({"tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / self.peak if self.peak else None,
                    "step_time_s": step_time, "phases": phases})
        hw = self.hardware.read()
        energy = hw.pop("gpu_energy_j", math.nan)
        rec.update(hw)
        if self.world_group is not None and gather:
            mine = torch.tensor([step_time, energy], dtype=torch.float64, device=self.device)
            every = all_gather_list(mine, self.world_group)
            table = torch.stack(every).cpu()  # (world, 2)
            times = table[:, 0]
            rec.update({"step_time_max_s": float(times.max()), "step_time_min_s": float(times.min()),
                        "slowest_rank": int(times.argmax())})
            energy = float(table[:, 1].sum())  # nan when any GPU could not say
        if math.isfinite(energy):
            rec["energy_j"] = energy  # the whole job's GPUs over this step
            rec["j_per_token"] = energy / self.tokens_per_step
        self.timed.append(train_time)

    def say(self, line: str) -> None:
        """A console line from rank 0 that does not tear the progress bar."""
        if self.enabled:
            self.bar.write(line, file=sys.stdout)

    def summary(self) -> dict:
        """Mean throughput over this process' steps, the first left out (it pays for warm-up and compilation).

        Completes the steps still waiting for their timing (every rank must call it). `steps` counts the
        steps averaged; `step_time_s` is their training time (evaluation, checkpoints and profiler left out).
        """
        self._flush(keep_last=False)
        times = self.timed[1:] if len(self.timed) > 1 else self.timed
        if not times:
            return {}
        step_time = sum(times) / len(times)
        tokens_per_s = self.tokens_per_step / step_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        return {"steps": len(times), "first_left_out": len(self.timed) > 1, "step_time_s": step_time,
                "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / self.peak if self.peak else None}

    def close(self) -> None:
        """Write what is still pending (without the cross-rank fields: a failing run's peers may be gone)."""
        try:
            self._flush(keep_last=False, gather=False)
        except Exception:  # closing after a failure (e.g. out of memory): never hide the error that got us here
            pass
        finally:
            if self.enabled:
                self.bar.close()
                try:
                    self.file.close()
                except OSError:  # the tail of a line a full disk refused, flushed again: the first error says it
                    pass
                if self.tensorboard is not None:
                    self.tensorboard.close()
                if self.wandb is not None:
                    self.wandb.close()


def run_info(world_size: int, tp_size: int, device: torch.device, flops_per_token: int, tokens_per_step: int,
             seq_length: int, peak_override: float | None = None) -> dict:
    """What a report needs about the job that no step record says (RUN_DIR/run_info.json)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"world_size": world_size, "tp_size": tp_size, "dp_size": world_size // tp_size,
            "device_type": device.type, "device_name": name, "peak_tflops": peak_tflops(device, peak_override),
            "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step, "seq_length": seq_length}


def format_record(rec: dict) -> str:
    loss = "nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
    norm = "nan" if rec["grad_norm"] is None else f"{rec['grad_norm']:.3f}"
    line = (f"step {rec['step']:>7}  loss {loss}  lr {rec['lr']:.3e}  grad_norm {norm}  "
            f"{rec['tokens_per_s']:,.0f} tok/s  {rec['tflops']:.3g} TFLOP/s")
    if rec.get("mfu") is not None:
        line += f"  MFU {rec['mfu']:.1%}"
    if "max_mem_gib" in rec:
        line += f"  mem {rec['max_mem_gib']:.1f} GiB"
    for key, short in (("val_loss", "val"), ("test_loss", "test")):
        for name, value in rec.get(key, {}).items():
            line += f"  {short}/{name} {'nan' if value is None else f'{value:.4f}'}"
    return line


def format_summary(summary: dict) -> str:
    if not summary:
        return "no steps were run"
    which = ("steps (the first one after start left out)" if summary.get("first_left_out", True)
             else "step (the only one, warm-up included)")
    line = (f"throughput over {summary['steps']} {which}: "
            f"{summary['step_time_s']:.3f} s/step, {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{summary['tflops']:.3g} TFLOP/s per device")
    if summary["mfu"] is None:
        return line + ", MFU n/a (no GPU peak: set metrics.peak_tflops)"
    return line + f", MFU {summary['mfu']:.1%}"


def _truncate_after(path: Path, last_step: int) -> None:
    """Drop records of steps after `last_step` (a resumed run redoes them), so the file is one curve."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by a killed process
            continue
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):  # not a step record (valid JSON, not ours)
            continue
        if step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomically(path, "".join(kept))
