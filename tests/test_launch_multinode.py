"""examples/launch_multinode.sh under stand-in `torchrun` and `scontrol` commands: the torchrun line it
builds (quoting kept), and the ways a multi-node launch goes wrong before any rank starts."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "launch_multinode.sh"
# torchrun: one argument per line (NUL would be cleaner, but no argument here holds a newline).
TORCHRUN = '#!/bin/bash\nprintf "%s\\n" "$@" > "$LOG/torchrun"\n'
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RDZV_ID")}


def _launch(tmp_path: Path, args: list[str], env: dict[str, str], scontrol: str | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {"torchrun": TORCHRUN, **({"scontrol": scontrol} if scontrol else {})}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**CLEAN_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    launched = tmp_path / "torchrun"
    return proc, launched.read_text().splitlines() if launched.exists() else None


def test_arguments_reach_torchrun_unsplit(tmp_path):
    proc, argv = _launch(tmp_path, ["my configs/7b.yaml", "run_dir=/shared/my runs/a"],
                         {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"})
    assert proc.returncode == 0, proc.stderr
    assert argv == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", "node0:29500", "--rdzv_id", "megamath", "-m", "megamath.cli", "train",
                    "--config", "my configs/7b.yaml", "run_dir=/shared/my runs/a"]


def test_several_nodes_without_a_rendezvous_host_is_refused(tmp_path):
    """Each node would rendezvous with itself on localhost and wait for the others until torchrun's join
    timeout (15 minutes by default): refuse before starting."""
    proc, argv = _launch(tmp_path, ["examples/llemma_7b.yaml"], {"NNODES": "4", "NODE_RANK": "2"})
    assert proc.returncode != 0 and argv is None
    assert proc.stderr.strip().splitlines() == [
        "launch_multinode.sh: error: NNODES=4 needs MASTER_ADDR, the hostname of node 0 (every node must use the "
        "same; under SLURM it is read from SLURM_JOB_NODELIST)"]


def test_one_node_needs_no_rendezvous_host(tmp_path):
    proc, argv = _launch(tmp_path, ["examples/tiny.yaml"], {"GPUS_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--rdzv_endpoint") + 1] == "localhost:29500"


@pytest.mark.parametrize("hosts", [2, 30_000])  # 30,000 names: ~240 KB, beyond a 64 KB pipe
def test_master_addr_from_a_long_slurm_nodelist(tmp_path, hosts):
    """`scontrol show hostnames | head -n 1` under `set -e -o pipefail`: once the list outgrows the pipe,
    scontrol dies of SIGPIPE after head exits, and the script stopped without a word (hundreds of nodes)."""
    scontrol = f'#!/bin/bash\nfor ((i = 0; i < {hosts}; i++)); do echo "node$i"; done\n'
    proc, argv = _launch(tmp_path, ["examples/llemma_7b.yaml"],
                         {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[0-1]",
                          "SLURM_JOB_ID": "7"}, scontrol=scontrol)
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--rdzv_endpoint") + 1] == "node0:29500"
    assert argv[argv.index("--rdzv_id") + 1] == "7" and argv[argv.index("--node_rank") + 1] == "1"
