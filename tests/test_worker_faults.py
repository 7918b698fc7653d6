"""The workers of `megamath preprocess` and `megamath overlap` under faults, each planted at an exact point:
a worker killed (as by the out-of-memory killer) before it has read its start-up data or in the middle of
the run, an exception in a worker, a Ctrl-C while the workers start or while they work, a worker killed
half-way through sending a result. Every time the run ends (no hang), says one line (status 1 for a crash,
130 for Ctrl-C), leaves no process behind and publishes nothing half-done (`megamath/workers.py`)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_preprocess import bpe_model  # noqa: F401

# Runs `megamath COMMAND ...` with FAULT planted. Worker-side faults are patched in at import: spawned workers
# import this file as __mp_main__, so they run the patched code too.
SCRIPT = r'''
import os, signal, sys, time
from pathlib import Path

FAULT = os.environ["FAULT"]

# As a shell starts a foreground job: Ctrl-C neither ignored nor blocked, whatever the test process's state
# (both survive exec: started from a background job of a non-interactive shell, which ignores SIGINT, every
# Ctrl-C case ran to the end or hung). The main process only: a worker starts with it blocked, by design.
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def fault():
    if FAULT == "kill-mid":  # as the out-of-memory killer would
        os.kill(os.getpid(), signal.SIGKILL)
    if FAULT == "raise-mid":
        raise KeyError("planted")
    if FAULT == "int-mid":  # a terminal's Ctrl-C reaches the whole process group; then wait to be stopped
        os.killpg(0, signal.SIGINT)
        time.sleep(600)


if __name__ == "__mp_main__" and FAULT == "int-start":  # Ctrl-C while a worker is still importing
    os.killpg(0, signal.SIGINT)

# A named semaphore (a multiprocessing Queue or Lock) is left to the resource tracker when a process dies or
# exits at the wrong moment, and the tracker then prints warnings after the run's one line: none may be made.
from multiprocessing import resource_tracker
register = resource_tracker.register
resource_tracker.register = lambda name, rtype: (print(f"registered a {rtype}", file=sys.stderr),
                                                 register(name, rtype))

import megamath.data.preprocess_workers as preprocess_workers
import megamath.overlap.run as overlap_run

encode, scan = preprocess_workers.BatchEncoder.__call__, overlap_run.scan_file


def encode_with_fault(self, data):
    if b"FAULT" in data:
        fault()
    return encode(self, data)


def scan_with_fault(spec, path, group):
    yield from scan(spec, path, group)
    if path.name == "b.jsonl":
        fault()


preprocess_workers.BatchEncoder.__call__ = encode_with_fault
overlap_run.scan_file = scan_with_fault

if __name__ == "__main__":
    import multiprocessing
    import multiprocessing.popen_spawn_posix as popen_spawn_posix
    import megamath.data.preprocess as preprocess
    from megamath.cli import main

    read = preprocess._line_batches
    preprocess._line_batches = lambda groups, batch_bytes: read(groups, 300)  # many batches from a small input
    if FAULT == "kill-start":  # every worker dies before reading a byte of its start-up data
        from multiprocessing import resource_tracker
        resource_tracker.ensure_running()  # spawned with the real interpreter
        multiprocessing.set_executable(os.environ["DIE"])
    if FAULT == "int-launch":  # Ctrl-C inside the first worker's start()
        launch = popen_spawn_posix.Popen._launch

        def launch_then_ctrl_c(self, process_obj):
            launch(self, process_obj)
            os.killpg(0, signal.SIGINT)
        popen_spawn_posix.Popen._launch = launch_then_ctrl_c
    sys.exit(main(sys.argv[1:]))
'''

FAULTS = {  # fault -> (status, the one line after `megamath COMMAND: `)
    "kill-start": (1, r"error: (scan|preprocessing) worker megamath-\w+-\d \(pid \d+\) died with exit code -9 "
                      r"\(SIGKILL, e\.g\. the out-of-memory killer\)"),
    "kill-mid": (1, r"error: (scan|preprocessing) worker megamath-\w+-\d \(pid \d+\) died with exit code -9 "
                    r"\(SIGKILL, e\.g\. the out-of-memory killer\)"),
    "raise-mid": (1, r"error: a (scan|preprocessing) worker failed on \S+(\.jsonl|\.jsonl from line \d+): "
                     r"KeyError: 'planted'"),
    "int-start": (130, "interrupted"),
    "int-launch": (130, "interrupted"),
    "int-mid": (130, "interrupted"),
}


def _session(sid: int) -> list[int]:
    """Processes of session `sid` still running (a zombie has exited; only its reaping is left)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            found.append(int(entry.name))
    return found


def _run_with_fault(tmp_path: Path, fault: str, args: list[str]) -> tuple[int, list[str]]:
    (tmp_path / "faulty.py").write_text(SCRIPT)
    die = tmp_path / "die.sh"
    die.write_text("#!/bin/sh\nkill -9 $$\n")
    die.chmod(0o755)
    env = dict(os.environ, FAULT=fault, DIE=str(die), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    # A session of its own: its process group gets the Ctrl-C, as a terminal's foreground job would.
    proc = subprocess.Popen([sys.executable, str(tmp_path / "faulty.py"), *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{fault}: the run hung")
    deadline = time.monotonic() + 10  # workers killed with their parent may take a moment to go
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _session(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{fault}: processes outlived the run: {left}"
    return proc.returncode, err.splitlines()


def _check(command: str, fault: str, status: int, lines: list[str], out: Path) -> None:
    expected_status, expected = FAULTS[fault]
    assert status == expected_status and len(lines) == 1, (status, lines)
    assert re.fullmatch(f"megamath {command}: {expected}", lines[0]), lines[0]
    assert not list(out.iterdir()), f"left behind: {sorted(p.name for p in out.iterdir())}"


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
                                reason="finds the run's processes through /proc (Linux)")


@needs_proc
@pytest.mark.parametrize("fault", list(FAULTS))
def test_overlap_worker_faults(tmp_path, fault):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    # 200 items of 40 words at n = 3: a key table of ~128 KB, more than spawn's start-up pipe holds (64 KB),
    # so a worker that dies before reading its start-up data blocked the main process's write for good.
    items = [{"question": " ".join(rng.choices(words, k=40))} for _ in range(200)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        docs = [{"text": " ".join(rng.choices(words, k=60))} for _ in range(30)]
        (corpus / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    out = tmp_path / "out"
    out.mkdir()
    status, lines = _run_with_fault(tmp_path, fault, [
        "overlap", "--test", str(tmp_path / "test.jsonl"), "--field", "question", "--n", "3", "--corpus",
        *(str(corpus / f"{name}.jsonl") for name in "abc"), "--workers", "2", "--output", str(out / "hits.jsonl"),
        "--no-progress"])
    _check("overlap", fault, status, lines, out)


@needs_proc
@pytest.mark.parametrize("fault", list(FAULTS))
def test_preprocess_worker_faults(tmp_path, bpe_model, fault):  # noqa: F811
    texts = [f"document {i}: " + "some words of text " * 20 for i in range(40)]
    texts[25] = "FAULT " + texts[25]  # the fault strikes the batch holding it, after earlier batches were written
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    out = tmp_path / "out"
    out.mkdir()
    status, lines = _run_with_fault(tmp_path, fault, [
        "preprocess", "--input", str(tmp_path / "d.jsonl"), "--tokenizer-model", str(bpe_model), "--output-dir",
        str(out), "--workers", "2", "--no-progress"])
    _check("preprocess", fault, status, lines, out)


def _cut_message(tasks, results, parent_pid):
    """A worker killed half-way through sending a result: the header promises bytes that never come."""
    from megamath.workers import worker_started
    worker_started(parent_pid)
    os.write(results.fileno(), (1 << 20).to_bytes(4, "big") + b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_message_is_an_error_not_a_hang():
    """With one results queue for all workers, the main process blocked for good reading the rest of a cut
    message (the other workers hold the pipe's write end); each worker's own pipe ends at its death."""
    from megamath.workers import WorkerError, Workers

    workers = Workers(_cut_message, (), 1, "megamath-test", "test worker")
    try:
        with pytest.raises(WorkerError, match=r"^test worker megamath-test-0 \(pid \d+\) died with exit code -9 "):
            workers.receive()
    finally:
        workers.stop(terminate=True)
    assert not workers.procs[0].is_alive()


def _echo(tasks, results, parent_pid):
    from megamath.workers import task_stream, worker_started
    worker_started(parent_pid)
    for task in task_stream(tasks):
        results.send(task)


def test_big_tasks_and_big_results_at_once_do_not_deadlock():
    """Both directions far past a pipe's buffer: the main process sends a worker its second 4 MB task while
    the worker sends back its first; without the worker's reading thread each waits on the other for good."""
    from megamath.workers import Workers

    workers = Workers(_echo, (), 1, "megamath-test", "test worker")
    try:
        big = [bytes([k]) * (4 << 20) for k in range(2)]
        done = threading.Timer(60, lambda: os.kill(workers.procs[0].pid, signal.SIGKILL))  # a hang: an error
        done.start()
        for task in big:
            workers.send(workers.free(), task)
        assert workers.free() is None  # two in hand: no room for a third
        assert [workers.receive()[1] for _ in big] == big
        done.cancel()
    finally:
        workers.stop()
    assert workers.procs[0].exitcode == 0  # closing its task pipe ended it


def _exit_early(tasks, results, parent_pid):
    from megamath.workers import worker_started
    worker_started(parent_pid)


def test_a_worker_that_exits_with_tasks_in_hand_is_an_error():
    """Exit status 0 but a task never done: the other workers would wait for tasks and the main process for
    results, for good."""
    from megamath.workers import WorkerError, Workers

    workers = Workers(_exit_early, (), 1, "megamath-test", "test worker")
    try:
        workers.procs[0].join(timeout=30)
        workers.send(0, "a task")  # its pipe is broken: not an error here, receive says what happened
        with pytest.raises(WorkerError, match=r"^test worker megamath-test-0 \(pid \d+\) exited with 1 task\(s\) "
                                              r"not done$"):
            workers.receive()
    finally:
        workers.stop(terminate=True)
