"""The profiler's files are published whole or not at all, and a profile that cannot be written never stops the
run it watches: the trace (torch.profiler's own writer), kernels_*.md and the CUDA memory snapshots (a stand-in
for `torch.cuda.memory._dump_snapshot` here: no GPU on CPU machines). A full disk is a real one, simulated by a
file size limit (RLIMIT_FSIZE) on this process while the trace is written, as tests/test_writer_faults.py does."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disk_full import file_size_limit
from forked_script import ScriptProcess
from megamath.training.profiling import StepProfiler
from test_train_loop import metrics, raw_config, run

HOST = socket.gethostname()


class Timer:
    """What StepProfiler asks of the trainer's PhaseTimer."""
    annotate = False

    @contextlib.contextmanager
    def phase(self, name):
        yield


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("fault", ["full disk", "profile is a file"])
def test_a_profile_that_cannot_be_written_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys, fault):
    """The trace's writer only logged a full disk and left its cut `NAME.tmp` in profile/; profile/ being a file
    stopped the run at its window's last step."""
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=4, checkpoint__save_every=0,
                     profile__steps=[2, 3])
    profile = tmp_path / "run" / "profile"
    if fault == "full disk":
        export = torch.profiler.profile.export_chrome_trace

        def export_on_a_full_disk(self, path, *args, **kwargs):
            with file_size_limit(1000):  # the trace of two steps is tens of KB
                return export(self, path, *args, **kwargs)

        monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", export_on_a_full_disk)
    else:
        profile.parent.mkdir(parents=True)
        profile.write_text("not a folder")
    assert run(raw).step == 4
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: rank")]
    trace = re.escape(str(profile / "trace_steps2-3_rank0.json"))
    if fault == "full disk":
        assert len(warnings) == 1 and re.fullmatch(
            rf"warning: rank 0: could not write {trace} \(\d+\.\d\d GiB free there\): .+; the run goes on without it",
            warnings[0]), warnings
        assert [p.name for p in profile.iterdir()] == ["kernels_steps2-3_rank0.md"]  # no temporary left
    else:
        assert len(warnings) == 2 and re.fullmatch(
            rf"warning: rank 0: could not write {trace}: FileExistsError: .+; the run goes on without it",
            warnings[0]), warnings
        assert "kernels_steps2-3_rank0.md" in warnings[1] and profile.read_text() == "not a folder"


def _profile_one_step(run_dir: Path) -> StepProfiler:
    profiler = StepProfiler([1, 1], False, run_dir, 0, torch.device("cpu"), Timer())
    profiler.begin(1)
    torch.randn(8, 8) @ torch.randn(8, 8)
    profiler.end(1)
    return profiler


def test_the_trace_is_written_beside_its_name_and_renamed_into_place(tmp_path, monkeypatch):
    """It was exported straight to its name: a kill or a full disk mid-write left a cut trace there."""
    given = []
    export = torch.profiler.profile.export_chrome_trace

    def export_and_look(self, path, *args, **kwargs):
        given.append(Path(path))
        assert not list((tmp_path / "profile").glob("trace_*"))  # nothing under the real name while it is written
        return export(self, path, *args, **kwargs)

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", export_and_look)
    _profile_one_step(tmp_path)
    profile = tmp_path / "profile"
    assert len(given) == 1 and given[0].parent == profile
    assert given[0].name.startswith(f".trace_steps1-1_rank0.json.tmp-{HOST}-{os.getpid()}-")
    events = json.loads((profile / "trace_steps1-1_rank0.json").read_text())["traceEvents"]
    assert "step 1" in {e.get("name") for e in events}
    assert sorted(p.name for p in profile.iterdir()) == ["kernels_steps1-1_rank0.md", "trace_steps1-1_rank0.json"]


def test_a_trace_cut_in_its_writers_last_flush_is_not_published(tmp_path, monkeypatch, capsys):
    """torch.profiler's writer checks its writes before its last flush only: a disk that filled in that flush
    (all of a small trace) left a cut trace, renamed into place with no error."""
    whole = _profile_one_step(tmp_path / "whole").dir / "trace_steps1-1_rank0.json"
    size = whole.stat().st_size
    json.loads(whole.read_text())
    export = torch.profiler.profile.export_chrome_trace
    for limit in (1000, size // 2, size - 100, size - 2, size + 100):
        def export_on_a_full_disk(self, path, *args, **kwargs):
            with file_size_limit(limit):
                return export(self, path, *args, **kwargs)

        monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", export_on_a_full_disk)
        run_dir = tmp_path / f"limit{limit}"
        _profile_one_step(run_dir)
        trace = run_dir / "profile" / "trace_steps1-1_rank0.json"
        warned = capsys.readouterr().out
        if trace.exists():  # whole, or nothing (a trace a few bytes shorter than the first fits the limit)
            assert json.loads(trace.read_text())["traceEvents"] and not warned, (limit, size, warned)
        else:
            assert limit < size + 100 and re.fullmatch(
                rf"warning: rank 0: could not write {re.escape(str(trace))} \(\d+\.\d\d GiB free there\): the trace "
                r"was cut short \(the disk filled as it was written\?\); the run goes on without it\n", warned), warned
        if limit <= size - 100:  # far short of any run's trace: nothing
            assert not trace.exists()
        elif limit > size:  # room enough: the trace, whole
            assert trace.exists()
        assert sorted(p.name for p in trace.parent.iterdir()) == ["kernels_steps1-1_rank0.md"] + \
            (["trace_steps1-1_rank0.json"] if trace.exists() else [])


KILLED_MID_TRACE = """
import os, signal, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_profile_writes import _profile_one_step

def cut(self, path, *args, **kwargs):  # half a trace written, then the process is killed
    Path(path).write_text('{"traceEvents": [{"name": "step 1", ')
    os.kill(os.getpid(), signal.SIGKILL)

torch.profiler.profile.export_chrome_trace = cut
_profile_one_step(Path(sys.argv[1]))
"""


def test_a_run_killed_mid_trace_leaves_no_cut_trace_and_the_next_run_removes_its_temporary(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_TRACE)
    proc = ScriptProcess(script, [tmp_path, Path(__file__).parent], log=None)  # forked: no Python start, no imports
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    profile = tmp_path / "profile"
    left = [p.name for p in profile.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".trace_steps1-1_rank0.json.tmp-{HOST}-{proc.pid}-"), left
    # another window's temporary of a live writer (this process) stays; the dead writers' go, any window's
    (profile / f".trace_steps7-8_rank1.json.tmp-{HOST}-{os.getpid()}-0").write_text("live")
    (profile / f".memory_step3_rank0.pickle.tmp-{HOST}-{dead_pid()}-4").write_text("dead")
    StepProfiler([], False, tmp_path, 0, torch.device("cpu"), Timer())  # the next run, profiling nothing
    assert [p.name for p in profile.iterdir()] == [f".trace_steps7-8_rank1.json.tmp-{HOST}-{os.getpid()}-0"]


@pytest.fixture
def snapshots(monkeypatch):
    """A GPU profiler whose memory snapshots go through a stand-in dump; returns the names it was given."""
    given = []

    def dump(filename):
        given.append(Path(filename))
        with open(filename, "wb") as f:
            pickle.dump({"segments": []}, f)
            if getattr(dump, "fail", False):
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    return given, dump


def test_memory_snapshots_are_published_by_rename_and_a_failed_one_is_a_warning(tmp_path, snapshots, capsys):
    given, dump = snapshots
    profiler = StepProfiler([], True, tmp_path, 0, torch.device("cuda"), Timer())
    profiler.end(1)  # no window: the snapshot comes after the first step
    path = tmp_path / "profile" / "memory_step1_rank0.pickle"
    assert given[0].parent == path.parent and given[0].name.startswith(f".{path.name}.tmp-{HOST}-{os.getpid()}-")
    assert pickle.loads(path.read_bytes()) == {"segments": []}
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    dump.fail = True
    profiler = StepProfiler([], True, tmp_path, 0, torch.device("cuda"), Timer())
    profiler.end(2)  # the disk filled while this one was written: the run goes on
    out = capsys.readouterr().out
    assert re.fullmatch(rf"warning: rank 0: could not write {re.escape(str(path.with_name('memory_step2_rank0.pickle')))}"
                        r" \(\d+\.\d\d GiB free there\): No space left on device; the run goes on without it\n", out), out
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no cut snapshot, no temporary

    stop = str(profiler.out_of_memory(3, torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    assert f"could not write {path.with_name('oom_memory_rank0.pickle')}" in stop and "\n" not in stop, stop
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    dump.fail = False
    stop = str(profiler.out_of_memory(3, torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    assert f"memory snapshot written to {path.with_name('oom_memory_rank0.pickle')}" in stop, stop
