"""One `megamath overlap` run per output: a second run on the same HITS.jsonl is refused while the first scans
(they wrote their hits and summaries atomically but separately, so one run's summary could land beside the
other's hits), a lock left by a killed run is taken over, and runs writing other outputs in the same folder
both run."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megamath.cli import main
from megamath.overlap import run as overlap_run
from megamath.overlap.run import OverlapConfig, output_lock, overlap, summary_path
from megamath.run_lock import LockBusyError
from test_overlap import planted  # noqa: F401


def _argv(tmp: Path, out: Path) -> list[str]:
    return ["overlap", "--test", str(tmp / "test.jsonl"), "--field", "question", "--corpus", str(tmp / "corpus"),
            "--n", "20", "--workers", "1", "--output", str(out), "--no-progress"]


def _config(tmp: Path, out: Path) -> OverlapConfig:
    return OverlapConfig(tmp / "test.jsonl", ["question"], [tmp / "corpus"], out, ns=[20], progress=False)


def test_a_second_run_on_a_held_output_is_refused_in_one_line_and_changes_nothing(planted, capsys):
    tmp, _, _ = planted
    out = tmp / "hits.jsonl"
    assert main(_argv(tmp, out)) == 0
    before = {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}
    capsys.readouterr()
    with output_lock(out):  # another overlap run, scanning into the same output
        assert main(_argv(tmp, out)) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"megamath overlap: error: {re.escape(str(out))} is in use by another overlap run "
                        r"\(pid \d+ on \S+ since [-\d: ]+: .*\): wait for it to end or choose another --output\n",
                        err), err
    assert {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()} == before  # the lock file went too


def test_the_lock_is_held_for_the_whole_scan_and_other_outputs_in_the_folder_run(planted, monkeypatch):
    """While one run scans into hits.jsonl and then writes its summary, a second run on it is refused and a run
    on other.jsonl in the same folder finishes."""
    tmp, _, _ = planted
    out, other = tmp / "hits.jsonl", tmp / "other.jsonl"
    seen = []
    scan, publish_summary = overlap_run.map_files, overlap_run.write_text_atomically

    def scan_and_try_others(*args, **kwargs):
        if not seen:  # the first run's scan: the others start meanwhile
            seen.append("scan")
            with pytest.raises(LockBusyError, match=rf"{re.escape(str(out))} is in use by another overlap run"):
                overlap(_config(tmp, out))
            assert overlap(_config(tmp, other)).hit_lines == 5
        return scan(*args, **kwargs)

    def summary_while_held(path, text):
        if path == summary_path(out):
            with pytest.raises(LockBusyError):
                output_lock(out).acquire()
            seen.append("summary")
        publish_summary(path, text)

    monkeypatch.setattr(overlap_run, "map_files", scan_and_try_others)
    monkeypatch.setattr(overlap_run, "write_text_atomically", summary_while_held)
    assert overlap(_config(tmp, out)).hit_lines == 5
    assert seen == ["scan", "summary"]
    assert out.read_bytes() == other.read_bytes() and summary_path(other).is_file()
    assert not list(tmp.glob(".*.lock"))  # released, and removed with it


def test_outputs_that_share_a_summary_share_the_lock(planted):
    """`--output hits` and `--output hits.jsonl` write different hits files but the same hits.summary.json, so
    one run on each at once would leave one's summary beside the other's hits: the second is refused."""
    tmp, _, _ = planted
    assert summary_path(tmp / "hits") == summary_path(tmp / "hits.jsonl")
    with output_lock(tmp / "hits.jsonl"):
        with pytest.raises(LockBusyError, match=rf"^{re.escape(str(tmp / 'hits'))} is in use by another overlap run"):
            overlap(_config(tmp, tmp / "hits"))
    assert not (tmp / "hits").exists() and not summary_path(tmp / "hits").exists()
    assert overlap(_config(tmp, tmp / "hits")).hit_lines == 5  # released: the same output now runs


HOLD_AND_DIE = """
import os, signal, sys
from megamath.overlap.run import output_lock
output_lock(sys.argv[1]).acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_lock_left_by_a_killed_run_is_taken_over(planted):
    tmp, _, _ = planted
    out = tmp / "hits.jsonl"
    proc = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = tmp / ".hits.summary.json.lock"
    assert left.read_text().startswith("overlap run\npid ")  # the dead holder's file, still there
    assert overlap(_config(tmp, out)).hit_lines == 5
    assert not left.exists()
