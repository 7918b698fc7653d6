"""`megamath preprocess` under faults: kill -9 leaves no worker alive, the next run cleans up after it; one
run per output folder; zero-byte archives and names that would leave the output folder are refused."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamath.cli import main
from megamath.data.preprocess import preprocess
from megamath.data.sources import InputGroup
from megamath.run_lock import FolderBusyError, FolderLock
from test_preprocess import _config, _texts, _write, bpe_model  # noqa: F401

# preprocess() with 2 workers whose main side is slowed down (one batch every 0.2 s), so the test can
# kill it mid-run while the workers are alive and a dataset is half written.
SLOW = """
import sys, time
import megamath.data.preprocess as pp
from pathlib import Path
read = pp._line_batches
def slow(groups, batch_bytes):
    for batch in read(groups, batch_bytes):
        time.sleep(0.2)
        yield batch
pp._line_batches = slow
if __name__ == "__main__":
    src, model, out = sys.argv[1:4]
    pp.preprocess(pp.PreprocessConfig(inputs=[src], tokenizer_model=model, output_dir=out, workers=2,
                                      batch_bytes=300, progress=False))
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc (Linux)")
def test_kill_9_leaves_no_worker_and_the_next_run_cleans_up(tmp_path, bpe_model):
    src = _write(tmp_path / "d.jsonl", [{"text": t} for t in _texts(3, 200)])
    out = tmp_path / "out"
    (tmp_path / "slow.py").write_text(SLOW)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), str(src), str(bpe_model), str(out)])
    try:
        deadline = time.time() + 120
        while not (out.is_dir() and any(".tmp-" in p.name for p in out.iterdir())):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        workers = [pid for pid in _children(proc.pid) if "megamath" in Path(f"/proc/{pid}/cmdline").read_text()
                   or "multiprocessing" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) >= 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.time() + 5
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)], "worker processes outlived their parent"
    stale = sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)
    assert stale  # the dead run's temporaries
    summary = preprocess(_config([src], bpe_model, out, workers=2))
    assert summary[0].documents == 200
    assert sorted(p.name for p in out.iterdir()) == ["d_text_document.bin", "d_text_document.idx"]


def test_a_second_run_into_one_output_folder_is_refused(tmp_path, bpe_model, capsys):
    src = _write(tmp_path / "d.jsonl", [{"text": "x"}])
    with FolderLock(tmp_path / "out", "preprocess run"):
        with pytest.raises(FolderBusyError, match=r"out is in use by another preprocess run \(pid \d+ on "):
            preprocess(_config([src], bpe_model, tmp_path / "out", workers=1))
        assert main(["preprocess", "--input", str(src), "--tokenizer-model", str(bpe_model), "--output-dir",
                     str(tmp_path / "out"), "--no-progress"]) == 2
        assert "is in use by another preprocess run" in capsys.readouterr().err
    assert preprocess(_config([src], bpe_model, tmp_path / "out", workers=1))[0].documents == 1


@pytest.mark.parametrize("name", ["empty.jsonl.zst", "empty.jsonl.gz"])
def test_zero_byte_archives_are_errors(tmp_path, bpe_model, capsys, name):
    (tmp_path / name).write_bytes(b"")
    assert main(["preprocess", "--input", str(tmp_path / name), "--tokenizer-model", str(bpe_model),
                 "--output-dir", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"megamath preprocess: error: {tmp_path / name}: empty file (0 bytes) is not a valid " \
                  f"{name.rsplit('.', 1)[1]} archive\n"
    assert not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]


def test_json_key_that_leaves_the_output_folder_is_refused(tmp_path, bpe_model, capsys):
    src = _write(tmp_path / "d.jsonl", [{"a/../../x": "text"}])
    assert main(["preprocess", "--input", str(src), "--tokenizer-model", str(bpe_model), "--output-dir",
                 str(tmp_path / "out"), "--json-key", "a/../../x", "--workers", "1", "--no-progress"]) == 2
    assert "--json-key 'a/../../x' would name datasets outside --output-dir" in capsys.readouterr().err
    assert not list(tmp_path.glob("x_*")) and not os.path.exists(tmp_path.parent / "x_document.bin")


def test_dots_inside_a_name_are_no_path(tmp_path, bpe_model, capsys):
    """`v1..2.jsonl` and a key `a..b` were refused for holding "..", and the refusal blamed --json-key even for
    a file name. Only separators, or a whole `.` / `..` key, are refused, and the blame goes to the cause."""
    src = _write(tmp_path / "v1..2.jsonl", [{"a..b": "hello"}])
    assert main(["preprocess", "--input", str(src), "--tokenizer-model", str(bpe_model), "--output-dir",
                 str(tmp_path / "out"), "--json-key", "a..b", "--workers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v1..2_a..b_document.bin",
                                                                    "v1..2_a..b_document.idx"]
    for key in (".", ".."):
        with pytest.raises(ValueError, match=rf"^--json-key '{re.escape(key)}' is a folder's name, not a usable key"):
            _config([src], bpe_model, tmp_path / "out", json_key=key)
    with pytest.raises(ValueError, match=r"^dataset name 'a\\\\b_text_document' \(from the input name\) is not a "
                                         r"plain file name: use names without path separators$"):
        InputGroup("a\\b", (src,)).output_prefix(tmp_path, "text")
    with pytest.raises(ValueError, match=r"^dataset name 'x_a/b_document' \(from --json-key\) is not a plain"):
        InputGroup("x", (src,)).output_prefix(tmp_path, "a/b")


def test_os_errors_on_user_paths_are_one_line(tmp_path, bpe_model, capsys):
    src = _write(tmp_path / "d.jsonl", [{"text": "x"}])
    (tmp_path / "file").write_text("a regular file")
    assert main(["preprocess", "--input", str(src), "--tokenizer-model", str(bpe_model), "--output-dir",
                 str(tmp_path / "file" / "out"), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megamath preprocess: error: ") and str(tmp_path / "file") in err
    with pytest.raises(NotADirectoryError):  # --debug: the traceback for whoever needs it
        main(["--debug", "preprocess", "--input", str(src), "--tokenizer-model", str(bpe_model), "--output-dir",
              str(tmp_path / "file" / "out"), "--workers", "1", "--no-progress"])


def test_skip_bad_files_drops_empty_and_broken_archives_whole(tmp_path, bpe_model, capsys):
    split = tmp_path / "pp2" / "arxiv" / "train"
    _write(split / "a.jsonl.zst", [{"text": t} for t in _texts(1, 30)])
    (split / "b.jsonl.zst").write_bytes(b"")
    broken = _write(split / "c.jsonl.gz", [{"text": t} for t in _texts(2, 300)])
    broken.write_bytes(broken.read_bytes()[:-200])  # cut inside the stream: the first lines would decode
    args = ["preprocess", "--input", str(tmp_path / "pp2"), "--tokenizer-model", str(bpe_model), "--output-dir",
            str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    assert main(args) == 2
    assert "b.jsonl.zst: empty file (0 bytes)" in capsys.readouterr().err
    assert main(args + ["--skip-bad-files"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {split / 'b.jsonl.zst'}: empty file (0 bytes)" in err
    assert f"warning: skipping {split / 'c.jsonl.gz'}: cannot decompress" in err
    expected = preprocess(_config([split / "a.jsonl.zst"], bpe_model, tmp_path / "only_a", workers=1))[0]
    for ext in (".bin", ".idx"):  # exactly the good file's dataset: nothing of the broken one's first lines
        assert (tmp_path / "out" / f"arxiv_train_text_document{ext}").read_bytes() == \
            (tmp_path / "only_a" / f"arxiv_train_text_document{ext}").read_bytes()
    assert expected.documents == 30
