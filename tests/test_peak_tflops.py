"""MFU's denominator: each GPU's dense (not 2:4 sparse) bf16 tensor-core peak, found by its CUDA name.

The names are what torch.cuda.get_device_name() returns; the peaks are NVIDIA's data-sheet figures
halved where the sheet quotes them with sparsity. PCIe/NVL cards run at lower clocks and power than the
SXM part of the same chip, so a name that merely contains the SXM part's name must not take its peak.
"""
import pytest
import torch

from megamath.training import metrics


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0),   # SXM: 1,979 with sparsity
    ("NVIDIA H100 PCIe", 756.0),        # 1,513 with sparsity
    ("NVIDIA H100 NVL", 835.0),         # 1,671 with sparsity
    ("NVIDIA H200", 989.0),             # SXM: 1,979 with sparsity
    ("NVIDIA H200 NVL", 835.0),         # 1,671 with sparsity (the PCIe card, 600 W)
    ("NVIDIA GH200 480GB", 989.0),
])
def test_dense_bf16_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_tflops(torch.device("cuda", 0)) == peak


def test_no_peak_off_a_gpu_or_for_an_unknown_one(monkeypatch):
    assert metrics.peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Tesla V100-SXM2-16GB")
    assert metrics.peak_tflops(torch.device("cuda", 0)) is None
    # a MIG slice is named after its chip, but holds a fraction of it: no peak (metrics.peak_tflops overrides)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    assert metrics.peak_tflops(torch.device("cuda", 0)) is None
    assert metrics.peak_tflops(torch.device("cuda", 0), override=140.0) == 140.0
