"""Per-step hardware readings of this process' GPU: NVML (nvidia-ml-py) and torch's allocator.

Why NVML and not torch alone: utilization, power, energy, temperature and clocks are the driver's
numbers; torch only knows its own allocations. Energy comes from the board's cumulative counter
(millijoules since the driver loaded), so `energy_j` is exact over the interval between two readings,
not a power sample times a duration. Everything here is optional: without a GPU, a driver or the
library, `read()` returns what it can (nothing on a CPU) and training goes on.
"""
from __future__ import annotations

import os

import torch


class HardwareProbe:
    """Readings of this process' GPU; `read()` gives the values since the previous `read()`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = None
        self.last_energy_mj: int | None = None
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
            self.last_energy_mj = self.energy_mj()
        except Exception:  # no library, no driver access: report without NVML
            self.handle = None

    def readers(self) -> dict:
        """NVML's per-step readings by their record key, each a call (empty without NVML)."""
        if self.handle is None:
            return {}
        nvml, handle = self.nvml, self.handle
        return {
            "gpu_util": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu_mem_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "temp_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
        }

    def energy_mj(self) -> int | None:
        """The board's energy counter, millijoules since the driver loaded (None where it has none)."""
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:  # boards before Volta have no energy counter
            return None

    def read(self) -> dict:
        """NVML's utilization (%), memory used (GiB), power (W), temperature (°C), SM clock (MHz) and the
        energy (J) since the previous call, plus torch's allocator retries and peak reserved memory."""
        if self.device.type != "cuda":
            return {}
        stats = torch.cuda.memory_stats(self.device)
        out = {"max_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30,
               "alloc_retries": int(stats.get("num_alloc_retries", 0))}
        if self.handle is None:
            return out
        for key, reader in self.readers().items():
            try:
                out[key] = reader()
            except Exception:  # a field this board or driver does not report
                pass
        energy = self.energy_mj()
        if energy is not None and self.last_energy_mj is not None:
            out["gpu_energy_j"] = (energy - self.last_energy_mj) / 1000.0
        self.last_energy_mj = energy
        return out
