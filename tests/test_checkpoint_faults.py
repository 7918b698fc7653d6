"""Faults during a run: a process killed at random points of a save, a second training on the same run_dir."""
import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from forked_script import ScriptProcess
from megamath.cli import main
from megamath.run_lock import LOCK_NAME, FolderBusyError, FolderLock
from megamath.training import checkpoint as ckpt
from megamath.training.checkpoint import LATEST, latest_checkpoint
from megamath.training.checkpoint_verify import verify_checkpoint
from test_train_loop import (  # noqa: F401
    assert_bitwise_equal, final_state, metrics, one_thread, raw_config, run, start_slow_training,
)

# Kills itself (SIGKILL: no cleanup of any kind) at I/O event `point` of the saves it makes: every fsync
# and the `latest` pointer write count as events, each with a point just before and just after. Under
# torchrun (a third argument), only rank KILL_RANK kills itself (-1: none); torchrun then ends the other
# rank with SIGTERM, which here terminates it (SIGUSR1 alone stays the preemption signal), as a node
# failure would.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import megamath.training.checkpoint as ckpt
import megamath.training.preemption as preemption
config, point = sys.argv[1], int(sys.argv[2])
kill_rank = int(sys.argv[3]) if len(sys.argv) > 3 else int(os.environ.get("RANK", 0))
preemption.PREEMPTION_SIGNALS = (signal.SIGUSR1,)
events = {"n": 0}

def at_event(original):
    def wrapped(*args):
        for phase in (0, 1):
            if events["n"] == point:
                os.kill(os.getpid(), signal.SIGKILL)
            events["n"] += 1
            if phase == 0:
                result = original(*args)
        return result
    return wrapped

if int(os.environ.get("RANK", 0)) == kill_rank:
    ckpt._fsync, ckpt._write_text_atomically = at_event(ckpt._fsync), at_event(ckpt._write_text_atomically)
from megamath.cli import main
sys.exit(main(["train", "--config", config]))
"""
POINTS_PER_SAVE = 14  # 6 fsyncs (3 shards, metadata, temp folder, checkpoints folder) + the pointer, x2


def run_killer(script: Path, config: Path, point: int) -> tuple[int | None, str]:
    """KILLER in a fresh single process (tests/forked_script.py): (exit code, -9 when it killed itself; output)."""
    proc = ScriptProcess(script, [config, point], Path(f"{script}.{point}.log"))
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, output


def test_kill_at_random_points_of_a_save_always_resumes_exactly(tmp_path, one_thread):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=8, checkpoint__save_every=2,
                     checkpoint__keep=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "killer.py").write_text(KILLER)
    points = random.Random(7).sample(range(POINTS_PER_SAVE - 2), 3) + [12, 13]  # and around the pointer
    for point in points:
        returncode, output = run_killer(tmp_path / "killer.py", tmp_path / "run.yaml", point)
        assert returncode == -9, (point, output)
        latest = latest_checkpoint(tmp_path / "run")
        if latest is not None:  # killed before the first pointer: a fresh start is right
            ok, line = verify_checkpoint(latest)
            assert ok, (point, line)
    run(raw)  # resume after the last kill, to the end
    straight = raw_config(tmp_path / "data", tmp_path / "straight", train_steps=8, checkpoint__save_every=2)
    run(straight)
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(tmp_path / "straight", 8))
    by_step = {r["step"]: r["loss"] for r in metrics(tmp_path / "run")}  # a replayed step logs the same loss
    assert by_step == {r["step"]: r["loss"] for r in metrics(tmp_path / "straight")}
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temporary folders of the killed attempts were removed under the lock


# I/O events per save (each with a point just before and just after): rank 0 writes the model, its optimizer
# shard and RNG state, metadata.json, fsyncs two folders and moves `latest` (7 events); rank 1 its optimizer
# shard and RNG state (2). Kills land in an attempt's second save, so a complete checkpoint exists before.
SECOND_SAVE_POINTS = {0: range(14, 28), 1: range(4, 8)}


def start_torchrun(script: Path, config: Path, kill_rank: int, point: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(config), str(point), str(kill_rank)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(script: Path, config: Path, kill_rank: int, point: int) -> subprocess.CompletedProcess:
    return finish(start_torchrun(script, config, kill_rank, point))


def test_one_rank_of_two_killed_mid_save_resumes_exactly(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=6, checkpoint__save_every=2,
                     micro_batch_size=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    straight = {**raw, "run_dir": str(tmp_path / "straight")}
    (tmp_path / "straight.yaml").write_text(yaml.safe_dump(straight))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # The undisturbed run shares nothing with the killed ones (its own run_dir and rendezvous port): it runs
    # beside them, using the core their launcher leaves idle while it starts.
    undisturbed = start_torchrun(script, tmp_path / "straight.yaml", -1, -1)
    try:
        rng = random.Random(11)
        for rank in (1, 0):
            point = rng.choice(SECOND_SAVE_POINTS[rank])
            proc = torchrun(script, tmp_path / "run.yaml", rank, point)
            assert proc.returncode != 0, (rank, point, proc.stdout[-2000:], proc.stderr[-2000:])
            latest = latest_checkpoint(tmp_path / "run")
            assert latest is not None, (rank, point)  # step 2 at least was complete before any kill
            ok, line = verify_checkpoint(latest)
            assert ok, (rank, point, line)
        resumed = torchrun(script, tmp_path / "run.yaml", -1, -1)  # resume after the last kill
        for proc in (resumed, finish(undisturbed)):
            assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        undisturbed.kill()  # already ended, unless a check above failed
    assert_bitwise_equal(final_state(tmp_path / "run", 6, dp_size=2), final_state(tmp_path / "straight", 6, dp_size=2))
    assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in metrics(tmp_path / "straight")]


def test_a_second_training_on_one_run_dir_is_refused_and_the_first_finishes(tmp_path, one_thread, capsys):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=6, checkpoint__save_every=2)
    proc = start_slow_training(tmp_path, raw, 1, "the first run ended too early")
    try:
        start = time.time()
        assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
        assert time.time() - start < 10  # at once, not after a timeout
        err = capsys.readouterr().err
        assert err.startswith(f"megamath train: error: {tmp_path / 'run'} is in use by another training "
                              f"(pid {proc.pid} on ") and err.endswith(": wait for it to end or choose another "
                                                                        "folder\n") and err.count("\n") == 1
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 7))
    root = tmp_path / "run" / "checkpoints"
    assert all(verify_checkpoint(p)[0] for p in root.glob("step_*"))
    straight = raw_config(tmp_path / "data", tmp_path / "straight", train_steps=6, checkpoint__save_every=2)
    run(straight)
    assert_bitwise_equal(final_state(tmp_path / "run", 6), final_state(tmp_path / "straight", 6))
    # the holder is gone: the lock is free again
    with FolderLock(tmp_path / "run", "training"):
        pass


def test_folder_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    """The refusal names what the holder is doing: a reshard refused by a training said "another reshard"."""
    first = FolderLock(tmp_path / "x", "training").acquire()
    for what, who in (("preprocess run", "a training"), ("training", "another training")):
        with pytest.raises(FolderBusyError, match=rf"x is in use by {who} \(pid \d+ on "):
            FolderLock(tmp_path / "x", what).acquire()
    first.release()
    FolderLock(tmp_path / "x", "training").acquire().release()
    fd = os.open(tmp_path / "x" / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # held by an older megamath: one line
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"pid 1 on host since then: megamath merge\n")
        with pytest.raises(FolderBusyError, match=r"x is in use by another merge \(pid 1 on host since then: "):
            FolderLock(tmp_path / "x", "merge").acquire()
    finally:
        os.close(fd)


def test_os_errors_on_the_run_dir_and_the_export_folder_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    raw = raw_config(tmp_path / "data", tmp_path / "file" / "run")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"megamath train: error: {tmp_path / 'file'}: exists and is not a folder\n", err
    assert main(["convert", "megamath-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_run_that_cannot_write_checkpoints_stops_before_its_first_step(tmp_path, capsys):
    """Found at the start, not at the first save hours in (the real permission refusal: test_unprivileged.py)."""
    raw = raw_config(tmp_path / "data", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ckpt.CHECKPOINTS).write_text("a file where the checkpoints go")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megamath train: error: cannot write checkpoints in {tmp_path / 'run' / ckpt.CHECKPOINTS} "
                          "(Not a directory): the run would lose its steps at its first save"), err
    assert err.count("\n") == 1 and not (tmp_path / "run" / "metrics.jsonl").exists()
    FolderLock(tmp_path / "run", "test").acquire().release()  # the refused start let its lock go


# What a full disk looks like from inside each writer (seen on a 256 KiB tmpfs): torch.save's zip writer and
# safetensors name neither the file nor the cause in any words a user searches for.
FULL_DISK = {"optimizer_tp00_dp000.pt": ("torch", RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                               "unexpected pos 93184 vs 93072")),
             "model_tp00.safetensors": ("safetensors", SafetensorError("Error while serializing: I/O error: "
                                                                       "No space left on device (os error 28)"))}


@pytest.mark.parametrize("name", list(FULL_DISK))
def test_a_full_disk_during_a_save_is_one_line_naming_the_file_then_resumes(tmp_path, monkeypatch, one_thread, capsys,
                                                                           name):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=4, checkpoint__save_every=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    writer, error = FULL_DISK[name]
    target, attr = (torch, "save") if writer == "torch" else (ckpt, "save_safetensors")
    real = getattr(target, attr)

    def disk_fills_before_the_second_save(obj, path, *args, **kwargs):
        if ".step_0000004.tmp" in str(path) and str(path).endswith(name):
            raise error
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(target, attr, disk_fills_before_the_second_save)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    root = tmp_path / "run" / "checkpoints"
    assert err.count("\n") == 1 and re.match(
        rf"megamath train: error: could not write checkpoint file {re.escape(str(root))}/\.step_0000004\.tmp-\w+/"
        rf"{re.escape(name)} \(\d+\.\d\d GiB free there\): {re.escape(str(error))}; the checkpoints saved before are "
        r"untouched$", err), err
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    monkeypatch.undo()  # room was made: the run resumes from step 2 and finishes
    assert run(raw).step == 4 and verify_checkpoint(root / "step_0000004")[0]


class Killed(BaseException):
    """The job's time limit reached mid-delete (SIGKILL: nothing after it runs)."""


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch, one_thread):
    """Pruning a big checkpoint takes a while on a parallel filesystem; a kill in it once left a step folder
    without metadata.json, which nothing ever counted, pruned or cleaned: its shards stayed on disk for good."""
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=4, checkpoint__save_every=2,
                     checkpoint__keep=1)
    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if "step_0000002" in Path(path).name and (Path(path) / "metadata.json").is_file():  # pruned
            (Path(path) / "metadata.json").unlink()  # the filesystem's listing order put it first
            raise Killed
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):  # while pruning step 2, just after step 4 was saved
        run(raw)
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    assert run(raw).step == 4  # the next start (nothing left to train) cleans up
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000004"]


def _processes_running(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (torchrun starts each rank in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if marker.encode() in (entry / "cmdline").read_bytes() and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the ranks through /proc (Linux)")
def test_ranks_whose_torchrun_agent_was_killed_save_and_stop(tmp_path):
    """SIGKILL of the agent alone (the out-of-memory killer's choice, or a careless kill): its ranks, each in a
    session of its own, got no signal and trained on unwatched, holding the run's lock for good. They now
    save a checkpoint at the end of the step and exit, so the next launch resumes from it."""
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=400, checkpoint__save_every=1000,
                     micro_batch_size=1, log_every=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    script = tmp_path / "orphan.py"
    script.write_text(KILLER)  # no kill point: it only trains
    proc = start_torchrun(script, tmp_path / "run.yaml", -1, -1)
    log = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.05)
        proc.kill()  # the agent; its ranks live on as orphans
        out, err = proc.communicate(timeout=120)  # the ranks hold its pipes: they end when the ranks do
    finally:
        proc.kill()
        for pid in _processes_running(str(script)):
            os.kill(pid, signal.SIGKILL)
    assert not _processes_running(str(script))
    stopped = len(metrics(tmp_path / "run"))
    assert stopped < 400, "the run ended before the kill"
    assert re.search(rf"stopping on the loss of its torchrun agent \(pid \d+\) after step {stopped}: checkpoint saved",
                     out + err), (out[-2000:], err[-2000:])
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == ckpt.step_dir_name(stopped)
    ok, line = verify_checkpoint(latest)
    assert ok, line
