"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported, hence here. The interpreter's
repeated scan of triton.language is cached (tests/interpreter_speedup.py: same kernels, same values).

The checkout's root leaves sys.path here: `python -m pytest` (and pytest-xdist's workers) put it first,
where kernels/ (installed as megamath.kernels) would shadow the package named `kernels` that
transformers imports since 5.25. The tests import megamath as installed, never from the root.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speedup import install

    install()


def pytest_sessionstart(session):
    """Refuse, in one line, an interpreter that cannot run with this numpy, before ~120 tests fail with a
    message that names neither (`interpreter_refusal`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy
        import triton

        refusal = interpreter_refusal(triton.__version__, numpy.__version__)
        if refusal:
            raise pytest.UsageError(refusal)


def interpreter_refusal(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run with this numpy, or None. Triton 3.6's (torch 2.11's) turns a
    one-element array into an int in a way numpy 2.4 rejects ("only 0-dimensional arrays can be converted to
    Python scalars"); Triton 3.8 fixed it."""
    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])

    if major_minor(triton_version) < (3, 8) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter cannot run with numpy {numpy_version}: "
                "install numpy<2.4 (or Triton 3.8 or later)")
    return None


def pytest_configure(config):
    """An xdist worker's share of the CPUs for torch's intra-op threads, and for the processes its tests start
    (OMP_NUM_THREADS, unless set). Each worker's torch otherwise takes every CPU: 2 workers on 2 CPUs ran 4
    OpenMP threads, whose parallel regions wait for a thread the other worker has descheduled."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        threads = max(1, _usable_cpus() // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


@pytest.hookimpl(optionalhook=True)  # without pytest-xdist (a GPU machine's bare image) the hook is unknown
def pytest_xdist_auto_num_workers(config):
    """Workers for `-n auto` (make test): the CPUs this process may run on, a container's CPU quota included
    (a CI job limited to 2 CPUs may see the host's 64, and 8 workers on 2 CPUs only fight), at most 8."""
    return min(_usable_cpus(), 8)


def _usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0))
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda text: text.split()),  # cgroup v2: "quota period"
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda text: [text.strip(), _cgroup_v1_period()])):
        try:
            quota, period = parse(open(path).read())
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1"):
            cpus = min(cpus, max(1, int(quota) // int(period)))
        break
    return cpus


def _cgroup_v1_period() -> str:
    with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
        return f.read().strip()
