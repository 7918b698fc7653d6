"""The numbers of `megamath plan` against what they claim to be (measured efficiency, step time, MFU)."""
import pytest

from megamath.planning.hardware import get_gpu
from megamath.planning.measured import measured_efficiency


def _bench_result(folder, date: str, device: str, mfu: float, layers: int = 4, seq: int = 4096,
                  peak: float | None = None, name: str | None = None) -> None:
    """A perf/results/train-DATE.md as perf/bench_train.py writes it: a title naming the device, the case's
    line, one megamath row."""
    peak = peak if peak is not None else (835.0 if "NVL" in device else 989.0 if "H" in device else 312.0)
    (folder / (name or f"train-{date}.md")).write_text("\n".join([
        f"# Training step, {date}: {device}", "",
        f"torch 2.11, transformers 5, triton 3.6; model: L {layers}, h 4096, heads 32/32, ffn 11008, vocab 32016, "
        f"S {seq}; 1 micro-batch(es) per optimizer step; median of 10 steps after 3 warm-up; model FLOPs/token "
        f"6.05e+09 (causal attention halved, same for every system); peak {peak} TFLOP/s", "",
        "| system | micro-batch | step ms | tokens/s | model TFLOP/s | MFU | peak GiB | plan GiB | vs ours |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| megamath | 1 | 500.0 | 8,192 | 400.0 | {100 * mfu:.1f} % | 30.1 | 29.0 | 1.00 |"]) + "\n")


@pytest.mark.parametrize("gpu, other_card", [
    ("h100-80gb", "NVIDIA H100 PCIe"),      # 350 W, 756 TFLOP/s peak: not the planned SXM part
    ("h100-80gb", "NVIDIA H100 NVL"),
    ("h200", "NVIDIA H200 NVL"),            # the 600 W PCIe card
    ("h200", "NVIDIA GH200 480GB"),         # a Grace Hopper superchip, another power and memory system
    ("a100-80gb", "NVIDIA A100 80GB PCIe"),
    ("a100-40gb", "NVIDIA A100-PCIE-40GB"),
])
def test_a_measurement_on_another_form_factor_is_not_the_planned_gpus(tmp_path, gpu, other_card):
    """The planned GPUs are the SXM parts (hardware.py: their memory, HBM and NVLink figures); a step
    measured on a PCIe/NVL card or a GH200 of the same chip must not be passed off as measured on them."""
    _bench_result(tmp_path, "2026-12-05", other_card, 0.40)
    assert measured_efficiency(get_gpu(gpu), tmp_path) is None
    sxm = {"h100-80gb": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200", "a100-80gb": "NVIDIA A100-SXM4-80GB",
           "a100-40gb": "NVIDIA A100-SXM4-40GB"}[gpu]
    _bench_result(tmp_path, "2026-12-04", sxm, 0.52)  # older, but on the planned part: it counts
    assert measured_efficiency(get_gpu(gpu), tmp_path).value == pytest.approx(0.52)


def test_only_the_default_case_against_the_gpus_own_peak_counts_as_measured(tmp_path):
    """A 2-layer or S 2048 run, or MFU over a --peak-tflops of the user's, is no measurement of the default
    case a plan scales: the planner took their MFU as the GPU's efficiency."""
    gpu = get_gpu("h100-80gb")
    _bench_result(tmp_path, "2026-12-07", "NVIDIA H100 80GB HBM3", 0.21, layers=2, name="train-2026-12-07-L2.md")
    _bench_result(tmp_path, "2026-12-06", "NVIDIA H100 80GB HBM3", 0.30, seq=2048, name="train-2026-12-06-S2048.md")
    _bench_result(tmp_path, "2026-12-05", "NVIDIA H100 80GB HBM3", 0.25, peak=700.0)
    assert measured_efficiency(gpu, tmp_path) is None
    _bench_result(tmp_path, "2026-12-04", "NVIDIA H100 80GB HBM3", 0.52)
    assert measured_efficiency(gpu, tmp_path).value == pytest.approx(0.52)


CUDA_TOTAL_MIB = {"a100-40gb": 40_536, "a100-80gb": 81_920, "h100-80gb": 81_082, "h200": 143_156}
"""torch.cuda.get_device_properties(d).total_memory of each SXM part, MiB (the smallest seen across
drivers): all the allocator and the CUDA context can ever have. On Hopper it is nvidia-smi's total less
the memory the driver reserves (81,559 and 143,771 MiB in nvidia-smi's listing)."""


@pytest.mark.parametrize("gpu", sorted(CUDA_TOTAL_MIB))
def test_capacity_is_what_cuda_can_allocate(gpu):
    """A plan that 'fits with 0.3 GiB to spare' must not count memory CUDA never hands out."""
    capacity_mib = get_gpu(gpu).memory_bytes / 2**20
    assert CUDA_TOTAL_MIB[gpu] * 0.99 <= capacity_mib <= CUDA_TOTAL_MIB[gpu], (gpu, capacity_mib)


def test_a_malformed_measurement_is_a_one_line_error_naming_its_file(tmp_path):
    """A hand-edited table whose MFU cell is not a number: which file, not float()'s bare complaint."""
    _bench_result(tmp_path, "2026-12-05", "NVIDIA H100 80GB HBM3", 0.52)
    path = tmp_path / "train-2026-12-05.md"
    path.write_text(path.read_text().replace("52.0 %", "52,0 %"))
    with pytest.raises(ValueError) as err:
        measured_efficiency(get_gpu("h100-80gb"), tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: megamath's MFU '52,0 %' is not a number") and "\n" not in message
