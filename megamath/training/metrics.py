"""What a run reports: one JSON object per step in RUN_DIR/metrics.jsonl, console lines, a throughput summary.

Throughput in Megatron's terms: tokens/s of the whole job, model TFLOP/s per device from
`ModelConfig.flops_per_token` (activation recomputation not counted, so this is MFU, not HFU), and MFU
against the device's dense bf16 peak. On CPUs there is no meaningful peak and MFU is null. GPU memory
comes from torch; utilization and power from NVML when nvidia-ml-py is importable (optional).
Only global rank 0 writes; the other ranks return before touching a file. With `logging.wandb` set, the
same records also go to Weights & Biases (wandb_log.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from megamath.training.wandb_log import WandbConfig, WandbSink, import_wandb

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name().
# Most specific first: an "H100 PCIe" must not match the SXM entry.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None (CPU, or a GPU missing from the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: non-finite values are written as null (the record's `skipped` says why)."""
    return x if math.isfinite(x) else None


class NvmlProbe:
    """Utilization and power of this process' GPU through NVML, or nothing when it is unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            index = torch.cuda.current_device() if device.index is None else device.index
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            if index < len(visible) and visible[index].strip().isdigit():
                index = int(visible[index])  # NVML numbers all GPUs, CUDA only the visible ones
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
        except Exception:  # no library, no driver access: report without NVML
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        try:
            return {"gpu_util": self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu,
                    "power_w": self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0}
        except Exception:
            return {}


class MetricsLogger:
    """Rank 0's metrics.jsonl, console lines and progress bar; every method is a no-op on other ranks."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, flops_per_token: int, world_size: int,
                 tokens_per_step: int, total_steps: int, first_step: int, log_every: int,
                 wandb: WandbConfig | None = None, run_config: dict | None = None) -> None:
        self.enabled = rank == 0
        # Every rank checks the package, so that a missing one fails the whole job at once; rank 0 loads it.
        wandb_module = import_wandb(wandb, load=self.enabled) if wandb is not None else None
        self.wandb = None
        self.device, self.flops_per_token, self.world_size = device, flops_per_token, world_size
        self.tokens_per_step, self.log_every = tokens_per_step, log_every
        self.peak = peak_tflops(device)
        self.timed: list[float] = []  # step times, for the summary
        if not self.enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        _truncate_after(self.path, first_step - 1)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its lines
        self.nvml = NvmlProbe(device)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=first_step - 1, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)
        if wandb_module is not None:
            self.wandb = WandbSink(wandb_module, wandb, run_dir, run_config)

    def record(self, step: int, loss: float, lr: float, grad_norm: float, skipped: bool, step_time: float,
               consumed_samples: int) -> dict:
        """The step's metrics as a dict (every rank builds it; rank 0 writes it with `write`)."""
        tokens_per_s = self.tokens_per_step / step_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12  # per device
        rec = {"step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
               "skipped": skipped, "tokens_per_s": tokens_per_s, "tflops": tflops,
               "mfu": tflops / self.peak if self.peak else None, "step_time_s": step_time,
               "consumed_samples": consumed_samples}
        if self.device.type == "cuda":
            rec["mem_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.enabled:
                rec.update(self.nvml.read())
        self.timed.append(step_time)
        return rec

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log(rec)
        self.bar.update(1)
        loss = "nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
        self.bar.set_postfix_str(f"loss {loss} lr {rec['lr']:.2e}", refresh=False)
        if rec["step"] % self.log_every == 0 or "val_loss" in rec:
            self.say(format_record(rec))

    def say(self, line: str) -> None:
        """A console line from rank 0 that does not tear the progress bar."""
        if self.enabled:
            self.bar.write(line, file=sys.stdout)

    def summary(self) -> dict:
        """Mean throughput over this process' steps, the first left out (it pays for warm-up and compilation).

        `steps` counts the steps averaged.
        """
        times = self.timed[1:] if len(self.timed) > 1 else self.timed
        if not times:
            return {}
        step_time = sum(times) / len(times)
        tokens_per_s = self.tokens_per_step / step_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        return {"steps": len(times), "step_time_s": step_time, "tokens_per_s": tokens_per_s,
                "tflops": tflops, "mfu": tflops / self.peak if self.peak else None}

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.wandb is not None:
                self.wandb.close()


def format_record(rec: dict) -> str:
    loss = "nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
    norm = "nan" if rec["grad_norm"] is None else f"{rec['grad_norm']:.3f}"
    line = (f"step {rec['step']:>7}  loss {loss}  lr {rec['lr']:.3e}  grad_norm {norm}  "
            f"{rec['tokens_per_s']:,.0f} tok/s  {rec['tflops']:.3g} TFLOP/s")
    if rec.get("mfu") is not None:
        line += f"  MFU {rec['mfu']:.1%}"
    if "max_mem_gib" in rec:
        line += f"  mem {rec['max_mem_gib']:.1f} GiB"
    for name, value in rec.get("val_loss", {}).items():
        line += f"  val/{name} {value:.4f}"
    return line


def format_summary(summary: dict) -> str:
    if not summary:
        return "no steps were run"
    line = (f"throughput over {summary['steps']} steps (the first one after start left out): "
            f"{summary['step_time_s']:.3f} s/step, {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{summary['tflops']:.3g} TFLOP/s per device")
    return line + (f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ", MFU n/a (no GPU peak)")


def _truncate_after(path: Path, last_step: int) -> None:
    """Drop records of steps after `last_step` (a resumed run redoes them), so the file is one curve."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:  # a line torn by a killed process
            continue
        if step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
