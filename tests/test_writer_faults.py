"""Faults in the commands that write datasets, caches, model folders and result files (checkpoints have
tests/test_checkpoint_faults.py): a full disk, simulated for real by a file size limit (RLIMIT_FSIZE) on the
writing process, which then fails its writes past the limit with EFBIG as a full disk fails them with ENOSPC.

Each command runs in a process of its own, forked from tests/forked_script.py's server (torch and megamath
already imported, ~2 s of CPU a process less than `python -m megamath.cli`), the limit set in it before the
command starts; its stdout and stderr go to pipes, which the limit does not hold (a log file would be cut)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import megamath.cli
from forked_script import ScriptProcess
from megamath.cli import main
from megamath.compat import megatron_preprocess
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.model import Llama, ModelConfig
from megamath.model.model_folder import save_model_folder
from megamath.run_lock import LOCK_NAME
from test_config_from_neox import LLEMMA_7B_YML
from test_preprocess import _texts, _write, bpe_model  # noqa: F401
from test_train_loop import metrics, raw_config, rewind, run

REPO = Path(__file__).resolve().parents[1]
CLI = Path(megamath.cli.__file__)  # `python CLI ARGS` runs `python -m megamath.cli ARGS`'s code as __main__
LIMIT = 1000  # bytes a file may reach: each output below is larger


def _dataset(prefix: Path, seed: int) -> str:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in np.random.default_rng(seed).integers(0, 500, size=(40, 50)):
            writer.add_document(doc)
    return str(prefix)


def _writers(tmp: Path, tokenizer: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (the command line after `megamath`, or a script's; the folder it writes into)."""
    src = _write(tmp / "in" / "d.jsonl", [{"text": t} for t in _texts(3, 200)])
    a, b = _dataset(tmp / "in" / "a", 1), _dataset(tmp / "in" / "b", 2)
    (tmp / "in" / "neox.yml").write_text(LLEMMA_7B_YML)
    torch.manual_seed(0)
    model = save_model_folder(Llama(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                                ffn_hidden_size=64, max_seq_length=32)), tmp / "in" / "model")
    out = tmp / "out"
    return {
        "preprocess": (["preprocess", "--input", str(src), "--tokenizer-model", str(tokenizer), "--output-dir",
                        str(out), "--workers", "1", "--no-progress"], out),
        "tools/preprocess_data.py": ([str(REPO / "tools" / "preprocess_data.py"), "--input", str(src),
                                      "--output-prefix", str(out / "pp"), "--tokenizer-type",
                                      "GPTSentencePieceTokenizer", "--tokenizer-model", str(tokenizer),
                                      "--workers", "1", "--partitions", "2", "--no-progress"], out),
        "merge": (["merge", "--input", a, b, "--output", str(out / "merged")], out),
        "blend": (["blend", "--data-path", "1", a, "1", b, "--seq-length", "8", "--num-samples", "400",
                   "--cache-dir", str(out)], out),
        "convert": (["convert", "megamath-to-hf", str(model), str(out / "hf")], out),
        "config": (["config", "from-neox", str(tmp / "in" / "neox.yml"), "--vocab-size", "32016", "--output",
                    str(out / "c.yaml"), "--force"], out),
    }


def _run(name: str, argv: list[str]) -> int:
    if name.startswith("tools/"):
        return megatron_preprocess.run(argv[1:])
    return main(argv)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _command(script: Path, args: list[str], **kwargs) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python script ARGS` in a process of its own (kwargs: ScriptProcess's
    env and file_size_limit: RLIMIT_FSIZE set, SIGXFSZ ignored there before the script starts)."""
    proc = ScriptProcess(script, args, None, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("name", ["preprocess", "tools/preprocess_data.py", "merge", "blend", "convert", "config"])
def test_a_full_disk_is_one_line_naming_the_file_and_loses_nothing(tmp_path, bpe_model, name):
    argv, out = _writers(tmp_path, bpe_model)[name]
    if name not in ("convert", "blend"):  # convert refuses an existing destination; blend would find its cache
        assert _run(name, argv) == 0  # a complete earlier output, which the failed run must leave as it was
    before = _files(out) if out.exists() else {}
    script, args = (Path(argv[0]), argv[1:]) if name.startswith("tools/") else (CLI, argv)
    returncode, _, stderr = _command(script, args, file_size_limit=LIMIT)
    prog = "preprocess_data.py" if name.startswith("tools/") else f"megamath {argv[0]}"
    assert returncode == 2 and stderr.count("\n") == 1 and re.match(
        rf"{re.escape(prog)}: error: could not write {re.escape(str(out))}/\S+ \(\d+\.\d\d GiB free there\): "
        r".*File too large.*; (any earlier .+ is untouched|nothing of it was kept|the inputs are untouched .+)\n$",
        stderr), stderr
    after = _files(out) if out.exists() else {}
    if before:
        assert after == before  # no temporary left, no earlier file changed
    else:  # blend: the datasets' own indices, each complete with its metadata, may stay cached
        assert not [p for p in after if Path(p).name.startswith(".")], list(after)
    assert _run(name, argv) == 0  # room made again: the same command succeeds


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread_module):
    """A finished 8-step run (checkpoints at 4 and 8, a metrics line per step) and its config file."""
    tmp = tmp_path_factory.mktemp("trained")
    raw = raw_config(tmp / "data", tmp / "run", train_steps=8, checkpoint__save_every=4, log_every=1)
    run(raw)
    (tmp / "run.yaml").write_text(yaml.safe_dump(raw))
    return tmp


@pytest.fixture(scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (file size limit, the run's file it strikes first, how deep the run folder lies): a start rewrites
# metrics.jsonl (cut after the resume step, ~0.5 KB a step) at once and config.yaml (~1.4 KB plus the run
# folder's path) with its first record; a run folder 1.4 KB deep makes config.yaml the larger of the two.
@pytest.mark.parametrize("limit, name, depth", [(1000, "metrics.jsonl", 0), (2500, "config.yaml", 7),
                                                (2500, "metrics.jsonl", 0)], ids=["cut", "config", "append"])
def test_a_full_disk_on_the_run_files_is_one_line_and_keeps_them_whole(tmp_path, trained, limit, name, depth):
    """A resume from step 4 on a full disk: config.yaml was rewritten in place (cut at the limit, the earlier
    one lost), and neither it nor metrics.jsonl was named in the error."""
    home = tmp_path.joinpath(*[c * 200 for c in "abcdefg"[:depth]])
    shutil.copytree(trained, home, dirs_exist_ok=True)
    raw = yaml.safe_load((home / "run.yaml").read_text())
    raw["run_dir"] = str(home / "run")
    (home / "run.yaml").write_text(yaml.safe_dump(raw))
    run_dir = home / "run"
    rewind(run_dir, 4)
    config = (run_dir / "config.yaml").read_bytes()
    logged = (run_dir / "metrics.jsonl").read_bytes()

    returncode, _, stderr = _command(CLI, ["train", "--config", str(home / "run.yaml")], file_size_limit=limit,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = stderr.splitlines()[-1]
    assert returncode == 2 and "Traceback" not in stderr and re.fullmatch(
        rf"megamath train: error: could not write {re.escape(str(run_dir / name))} \(\d+\.\d\d GiB free there\): "
        r"File too large; .+", last), stderr
    if limit == 1000:  # the cut failed: both files as they were
        assert (run_dir / "metrics.jsonl").read_bytes() == logged and (run_dir / "config.yaml").read_bytes() == config
    elif name == "config.yaml":  # the earlier one, whole
        assert (run_dir / "config.yaml").read_bytes() == config
    else:  # written whole before the disk filled (this copy's run_dir differs from the earlier one's)
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] == str(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:4]] == [1, 2, 3, 4]  # kept; a torn 5th goes on resume
    assert run(raw).step == 8  # room made again: the run resumes from step 4 and finishes
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))


# Runs `megamath ARGS` (or tools/preprocess_data.py's ARGS) with MODULE.ATTR replaced by a SIGKILL of the process.
KILLER = """
import importlib, os, signal, sys
module, attr, name = sys.argv[1:4]
setattr(importlib.import_module(module), attr, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
from megamath.cli import main
from megamath.compat import megatron_preprocess
sys.exit(megatron_preprocess.run(sys.argv[5:]) if name.startswith("tools/") else main(sys.argv[4:]))
"""
# Where the kill lands: a merge copying its first input; replace_atomically's fsync, its temporary written (the
# writer of every result file, index cache array and corpus file); a model export's first shard (config.json
# written); the tokenizing of the partitions (each a copy of the input, made in the output folder).
KILLED_AT = {"merge": ("shutil", "copyfileobj"),
             "config": ("os", "fsync"),
             "convert": ("megamath.model.safetensors_io", "save_safetensors"),
             "tools/preprocess_data.py": ("megamath.compat.megatron_preprocess", "preprocess")}


@pytest.mark.parametrize("name", list(KILLED_AT))
def test_the_run_after_a_kill_removes_the_killed_runs_temporary(tmp_path, bpe_model, name):
    """Nothing removed these temporaries, as large as the output, the model or the input."""
    argv, out = _writers(tmp_path, bpe_model)[name]
    (tmp_path / "killer.py").write_text(KILLER)
    returncode, _, stderr = _command(tmp_path / "killer.py", [*KILLED_AT[name], name, *argv])
    assert returncode == -signal.SIGKILL, stderr
    left = [p.name for p in out.iterdir() if p.name != LOCK_NAME]  # a lock file left is taken over at once
    assert len(left) == 1 and (".tmp-" in left[0] or "partitions" in left[0]), left  # the killed run's temporary
    assert _run(name, argv) == 0
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or "partitions" in p.name]
