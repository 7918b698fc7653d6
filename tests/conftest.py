"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported, hence here. The interpreter's
repeated scan of triton.language is cached (tests/interpreter_speedup.py: same kernels, same values).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speedup import install

    install()


@pytest.hookimpl(optionalhook=True)  # without pytest-xdist (a GPU machine's bare image) the hook is unknown
def pytest_xdist_auto_num_workers(config):
    """Workers for `-n auto` (make test): the CPUs this process may run on, a container's CPU quota included
    (a CI job limited to 2 CPUs may see the host's 64, and 8 workers on 2 CPUs only fight), at most 8."""
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
    return min(cpus, 8)


def _cgroup_v1_period() -> str:
    with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
        return f.read().strip()
