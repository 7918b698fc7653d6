"""Every Triton kernel compiles for an H100 (sm_90a) on this CPU-only machine, and the compiler's output
shows no sign of a slow GPU program at the configurations a run launches: within shared memory and the
register file, no spilled registers, wgmma tensor-core dots, 128-bit global accesses. The tuner's
attention candidates must fit and not spill either (a candidate that spills wastes a start-up timing).

This reads the compiler (perf/kernel_resources.py), not a GPU: how fast the programs run is measured on a
GPU only. The figures are those of the Triton installed here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("kernel_resources", REPO / "perf" / "kernel_resources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch,registers,threads,shared,blocks", [
    (90, 254, 128, 99328, 2),    # attention's default dK/dV tiles: registers and shared memory both allow 2
    (90, 168, 128, 114688, 2),   # the default forward: 2 x (112 + 1) KiB fit in 228 KiB
    (90, 124, 256, 114688, 2),   # 8 warps of 124 registers (128 allotted): 32 K registers per block
    (80, 255, 128, 86784, 1),    # an A100 holds 164 KiB: one 85 KiB block
    (90, 32, 256, 0, 8),         # an elementwise kernel: 8 blocks of 256 threads fill 2048 threads
    (90, 255, 512, 0, 0),        # 255 x 512 registers: over the register file, it cannot launch
])
def test_blocks_per_sm(arch, registers, threads, shared, blocks):
    tool = _tool()
    row = tool.Compiled(case="", kernel="", config="", arch=arch, default=True, shared_bytes=shared,
                        registers=registers, spill_bytes=0, threads=threads, tensor_cores="-", widest_access_bits=128)
    assert row.blocks_per_sm() == blocks


def _start_compile_for_h100(out: Path, *flags: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's Triton fuses multiply-adds by default
    return subprocess.Popen([sys.executable, str(REPO / "perf" / "kernel_resources.py"), "--arch", "90",
                             "--json", str(out), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _rows(proc: subprocess.Popen, out: Path) -> list[dict]:
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    if proc.returncode == 2:
        pytest.skip(f"this Triton cannot compile for NVIDIA GPUs here: {stderr.strip()[-300:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The two compilations the tests below read, started together: each is one single-threaded process
    (Python, torch, Triton, then ptxas per kernel), so on a 2-core machine they take the time of one."""
    tmp = tmp_path_factory.mktemp("kernel_resources")
    flags = {"defaults": ["--defaults-only"], "attention D128": ["--match", "attention D128"]}
    procs = {name: _start_compile_for_h100(tmp / f"{i}.json", *f) for i, (name, f) in enumerate(flags.items())}
    yield {name: (proc, tmp / f"{i}.json") for i, (name, proc) in enumerate(procs.items())}
    for proc in procs.values():  # one a deselected test never waited for
        proc.kill()
        proc.communicate()


def test_default_launches_compile_for_h100_without_signs_of_slowness(compiled):
    rows = _rows(*compiled["defaults"])
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
                       "_swiglu_bwd_kernel", "_ce_forward_kernel", "_ce_backward_kernel", "_adamw_kernel",
                       "_sum_of_squares_kernel", "_embedding_backward_kernel", "_fwd_kernel", "_bwd_preprocess_kernel",
                       "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for r in rows:
        where = f"{r['kernel']} ({r['case']}, {r['config']})"
        assert r["default"], where
        assert r["shared_bytes"] <= 232448 and r["registers"] * r["threads"] <= 65536, where
        assert r["blocks_per_sm"] >= 1, where
        assert r["spill_bytes"] == 0, where
        assert r["widest_access_bits"] == 128, where
        dots = r["kernel"] in {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
        assert r["tensor_cores"] == ("wgmma" if dots else "-"), where


def test_every_attention_tuning_candidate_fits_an_h100_without_spilling(compiled):
    rows = [r for r in _rows(*compiled["attention D128"]) if "candidate" in r["case"]]
    # Besides the defaults: 6 forward candidates (1 kernel), 5 backward ones (3 kernels) and 2 backward ones
    # with atomic dQ (2 kernels: no dQ kernel), at the default case's head_dim (perf/results/kernel-resources-*.md
    # has head_dim 64 and the A100 as well).
    assert len(rows) == 6 * 1 + 5 * 3 + 2 * 2
    for r in rows:
        where = f"{r['kernel']} ({r['case']})"
        assert r["shared_bytes"] <= 232448 and r["registers"] * r["threads"] <= 65536, where
        assert r["spill_bytes"] == 0, where
        assert r["tensor_cores"] in {"wgmma", "-"}, where  # not "wgmma+mma": every dot on wgmma
        # TMA candidates copy their loop's tiles with the tensor memory accelerator; the others never do.
        loop_loads = r["kernel"] in {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
        assert r["tma"] == (r["case"].endswith(" TMA") and loop_loads), where


@pytest.mark.parametrize("flags,interpret,message", [
    (["--arch", "75"], False, "unknown --arch 75; choose from [80, 90]"),
    (["--only", "softmax"], False, "unknown --only softmax; choose from"),
    ([], True, "unset TRITON_INTERPRET"),
])
def test_bad_requests_get_one_line_errors(flags, interpret, message):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(REPO / "perf" / "kernel_resources.py"), *flags],
                          capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "Warning" not in line and "warn_once" not in line]
    assert (done.returncode, len(errors)) == (2, 1), done.stderr
    assert message in errors[0] and done.stdout == ""
