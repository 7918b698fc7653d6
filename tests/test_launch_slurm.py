"""examples/launch_slurm.sbatch under stand-in `srun`, `scontrol` and `torchrun` commands: the launch line,
and the stopping path (USR1 or TERM to the batch script reaches the training ranks, not torchrun; a clean
stop at the time limit's USR1 requeues the job, a cancel's TERM does not)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "launch_slurm.sbatch"

FAKES = {
    # srun: drop its options, run the command. The forwarding call (--overlap, in the foreground) lingers
    # after delivering the signal, so the ranks have stopped before the batch script's trap returns: the
    # script must still report their exit status, not its interrupted `wait`'s (once a race under load).
    "srun": '#!/bin/bash\noverlap=0\nwhile [[ $1 == --* ]]; do [[ $1 == --overlap ]] && overlap=1; shift; done\n'
            'if ((overlap)); then "$@"; sleep 0.5; else exec "$@"; fi\n',
    "scontrol": '#!/bin/bash\nif [[ $1 == show ]]; then echo node0; echo node1; else echo "$@" >> "$LOG/scontrol"; fi\n',
    # torchrun: records its arguments and runs one "rank" as its child; exits with the rank's status.
    "torchrun": '#!/bin/bash\necho "$@" > "$LOG/torchrun"\n"$PY" "$LOG/rank.py" &\nwait $!\n',
}
RANK = """\
import os, signal, sys, time
log = os.environ["LOG"]
def stop(signum, frame):
    open(os.path.join(log, "rank-got"), "w").write(signal.Signals(signum).name)
    sys.exit(0)  # the checkpoint would be saved here
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(log, "rank-ready"), "w").write("")
time.sleep(60)
sys.exit(3)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs pgrep/pkill (procps)")
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_reaches_the_ranks_and_only_the_time_limit_requeues(tmp_path, sig):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (log / "rank.py").write_text(RANK)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "PY": sys.executable,
           "USER": os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
           "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "RUN_DIR": "runs/llemma-7b"}
    proc = subprocess.Popen(["bash", str(SCRIPT), "train_steps=10"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (log / "rank-ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert (log / "rank-got").read_text() == sig.name
    if sig == signal.SIGUSR1:  # the time limit's warning: come back and resume
        assert (log / "scontrol").read_text().split() == ["requeue", "42"]
    else:  # scancel (or a preemption, which a REQUEUE site handles itself): stopped for good
        assert not (log / "scontrol").exists() and "not requeued" in output, output
    launch = (log / "torchrun").read_text().split()
    assert launch == ["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                      "node0:29500", "--rdzv_id", "42", "-m", "megamath.cli", "train", "--config",
                      "examples/llemma_7b.yaml", "run_dir=runs/llemma-7b", "train_steps=10"]
    assert (tmp_path / "logs").is_dir() and (tmp_path / "runs" / "llemma-7b").is_dir()


def test_the_console_log_folder_exists_before_submission():
    """SLURM opens #SBATCH --output before the script runs and creates no folder for it: with logs/ missing
    (a fresh clone) the job dies at start with nothing written; the script's own `mkdir -p logs` is too late."""
    (output,) = [line.split("=", 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH --output=")]
    folder = Path(output).parent
    assert folder == Path(".") or (SCRIPT.parents[1] / folder).is_dir(), f"{folder}/ is not in the repository"


def test_the_training_step_gets_the_cpus_the_job_asked_for(tmp_path):
    """Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without passing it on, the step ran
    torchrun and its 8 ranks (8 OpenMP threads each) on the one CPU a task gets by default."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    fakes = {"srun": '#!/bin/bash\necho "$@" >> "$LOG/srun"\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
             "scontrol": FAKES["scontrol"], "torchrun": '#!/bin/bash\nexit 0\n'}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "42",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_CPUS_PER_TASK": "64"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (launch,) = (log / "srun").read_text().splitlines()
    assert "--cpus-per-task=64" in launch.split(), launch


def _launch_line(tmp_path, extra_env: dict[str, str]) -> list[str]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    fakes = {"srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n', "scontrol": FAKES["scontrol"],
             "torchrun": '#!/bin/bash\nprintf "%s\\n" "$@" > "$LOG/torchrun"\n'}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k not in ("CONFIG", "RUN_DIR")}, "LOG": str(log),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", **extra_env}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (log / "torchrun").read_text().splitlines()


def test_the_run_folder_is_the_configs_unless_run_dir_is_given(tmp_path):
    """CONFIG=examples/llemma_34b.yaml alone trained the 34B into runs/llemma-7b (the script's default RUN_DIR
    overrode the config's run_dir), where auto-resume would meet a 7B run's checkpoints."""
    launch = _launch_line(tmp_path, {"CONFIG": "examples/llemma_34b.yaml"})
    assert launch[launch.index("--config") + 1] == "examples/llemma_34b.yaml"
    assert not any(arg.startswith("run_dir=") for arg in launch), launch
    launch = _launch_line(tmp_path, {"CONFIG": "examples/llemma_34b.yaml", "RUN_DIR": "/shared/my runs/34b"})
    assert launch[-1] == "run_dir=/shared/my runs/34b"


@pytest.mark.parametrize("case", ["outside SLURM", "scontrol fails"])
def test_no_launch_without_a_rendezvous_host(tmp_path, case):
    """Without -e, a failed `scontrol show hostnames` left MASTER_ADDR empty and every node launched torchrun at
    ':29500'; outside SLURM the first sign was bash's 'unbound variable' after logs/ was made. Now one line, exit 2."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    fakes = {"srun": '#!/bin/bash\necho "$@" >> "$LOG/srun"\n',
             "scontrol": '#!/bin/bash\necho "scontrol: error: Invalid node name specified" >&2\nexit 1\n'}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log))
    if case == "scontrol fails":
        env.update(SLURM_JOB_ID="42", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not (log / "srun").exists(), "launched without a rendezvous host"
    expected = "no first host in SLURM_JOB_NODELIST" if case == "scontrol fails" else "SLURM_JOB_ID is not set"
    assert f"launch_slurm.sbatch: error: {expected}" in proc.stderr, proc.stderr
