"""Folders the user cannot write, refused by the operating system itself, not by a stand-in.

Why a separate file: root passes every permission check, and test machines often run as root, so the
other tests can only fake a refusal (a patched `os.access`, an injected PermissionError). Here each case
runs in a child process that a folder of mode 0o555 refuses: as root, the child is started without the
capabilities that override permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the owner's own
r-x applies to it as to anyone; as another user, nothing needs dropping.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from megamath.data.gpt_dataset import GPTDataset
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from test_train_loop import raw_config

PR_CAPBSET_DROP = 24  # prctl(2): remove a capability from the bounding set, so no exec'd program regains it
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_permission_overrides() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python args...` in a process that permission bits bind, root or not."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          preexec_fn=_drop_permission_overrides if os.geteuid() == 0 else None)


@pytest.fixture
def place(tmp_path):
    """tmp_path, checked to refuse a child where its mode says so; its read-only folders opened up after."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        run = run_unprivileged(["-c", f"open({str(probe / 'x')!r}, 'w')"], tmp_path)
    except OSError as err:  # no CAP_SETPCAP to drop capabilities with
        pytest.skip(f"cannot start a process without permission overrides here ({err}); the stand-in tests "
                    "still check the refusals")
    assert "PermissionError" in run.stderr, run.stderr
    yield tmp_path
    for folder in [tmp_path, *tmp_path.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)


def write_documents(prefix: Path) -> Path:
    """A small dataset of 25 random documents at `prefix`."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(25):
            writer.add_document(rng.integers(0, 60000, int(rng.integers(1, 31))))
    return prefix


def read_only_folder(path: Path) -> Path:
    path.mkdir(parents=True, mode=0o555)
    return path


def test_a_command_cannot_write_its_output_in_one_line(place):
    locked = read_only_folder(place / "locked-out")
    test_set = place / "test.jsonl"
    test_set.write_text('{"question": "' + " ".join(f"w{i}" for i in range(40)) + '"}\n')
    corpus = place / "corpus.jsonl"
    corpus.write_text('{"text": "nothing in common"}\n')
    run = run_unprivileged(["-m", "megamath.cli", "overlap", "--test", str(test_set), "--field", "question",
                            "--corpus", str(corpus), "--output", str(locked / "hits.jsonl")], place)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"megamath overlap: error: --output {locked / 'hits.jsonl'}: cannot write in "
                                  f"{locked} (permission denied)")
    dataset = write_documents(place / "data" / "docs")
    run = run_unprivileged(["-m", "megamath.cli", "merge", "--input", str(dataset), "--output",
                            str(locked / "merged" / "docs")], place)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == f"megamath merge: error: {locked / 'merged'}: Permission denied", run.stderr
    assert list(locked.iterdir()) == []


def test_a_training_that_cannot_write_checkpoints_stops_before_its_first_step(place):
    raw = raw_config(place / "data", place / "run")
    read_only_folder(place / "run" / "checkpoints")
    (place / "run.yaml").write_text(yaml.safe_dump(raw))
    run = run_unprivileged(["-m", "megamath.cli", "train", "--config", str(place / "run.yaml")], place)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"megamath train: error: cannot write checkpoints in {place / 'run' / 'checkpoints'} "
                                  "(Permission denied): the run would lose its steps at its first save; make the "
                                  "folder writable or choose another run_dir"), run.stderr
    assert not (place / "run" / "metrics.jsonl").exists()


def test_a_read_only_index_cache_serves_its_entries_and_builds_the_rest_in_memory(place):
    prefix = write_documents(place / "data" / "docs")
    cache = place / "cache"
    GPTDataset(IndexedDataset(str(prefix)), 20, 8, seed=3, cache_dir=cache)  # an entry built by its owner
    cache.chmod(0o555)
    script = textwrap.dedent(f"""
        import json, sys
        from megamath.data import index_cache
        from megamath.data.gpt_dataset import GPTDataset
        from megamath.data.indexed_dataset import IndexedDataset
        builds = []
        real = index_cache.IndexCache.save
        index_cache.IndexCache.save = lambda self, *a: (builds.append(1), real(self, *a))[1]
        dataset = IndexedDataset({str(prefix)!r})
        hit = GPTDataset(dataset, 20, 8, seed=3, cache_dir={str(cache)!r})
        miss = GPTDataset(dataset, 20, 8, seed=4, cache_dir={str(cache)!r})
        print(json.dumps({{"builds": len(builds), "hit": hit.shuffle_idx.tolist(), "miss": miss.shuffle_idx.tolist()}}))
    """)
    run = run_unprivileged(["-c", script], place)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["builds"] == 1  # the seed-3 entry was read, the seed-4 one built
    assert f"index cache {cache} cannot be written (Permission denied)" in run.stderr
    dataset = IndexedDataset(str(prefix))
    assert out["hit"] == GPTDataset(dataset, 20, 8, seed=3).shuffle_idx.tolist()
    assert out["miss"] == GPTDataset(dataset, 20, 8, seed=4).shuffle_idx.tolist()
    assert len(list(cache.iterdir())) == 4  # the owner's entry (metadata and three arrays), nothing added
