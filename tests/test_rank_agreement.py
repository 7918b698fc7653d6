"""Ranks that were launched differently stop the job with one line at start-up, instead of training
something else with exit 0 or hanging in mismatched collectives (megamath.parallel.agreement, run_guard,
resume); a peer that stops answering is an error after the job's timeout, told in one line."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from distributed import run_distributed
from megamath.dotted_keys import flatten
from megamath.parallel.agreement import disagreement
from megamath.parallel.peer_failure import lost_peer
from test_train_loop import one_thread  # noqa: F401


def test_disagreement_names_each_key_with_rank_0s_value_and_the_first_other():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    same = {"optimizer": {"lr": 3e-3}, "data": {"data_path": ["a"]}}
    assert disagreement([same, dict(same)]) is None
    assert disagreement([same, {"optimizer": {"lr": 1e-2}, "data": {"data_path": ["a"]}}, same]) == \
        "optimizer.lr: 0.003 on rank 0, 0.01 on rank 1"
    assert disagreement([same, same, {"optimizer": {"lr": 3e-3}}]) == "data.data_path: ['a'] on rank 0, unset on rank 2"
    many = disagreement([{f"k{i}": 0 for i in range(5)}, {f"k{i}": 1 for i in range(5)}])
    assert many.endswith("k2: 0 on rank 0, 1 on rank 1; and 2 more") and many.count(" on rank 0") == 3
    assert "..." in disagreement([{"x": "y" * 200}, {"x": "z"}])  # long values are cut, the line stays one line


def _configs_differ(rank: int, world_size: int, out_dir) -> None:
    from megamath.parallel.state import ParallelState

    config = {"optimizer": {"lr": 1e-2 if rank == 1 else 3e-3}, "parallel": {"tp_size": 1}}
    try:
        ParallelState.from_env(1, same_on_every_rank=config)
    except ValueError as err:
        (out_dir / f"rank{rank}.txt").write_text(str(err))


def test_a_rank_given_another_config_stops_every_rank_before_the_groups_are_built(tmp_path):
    run_distributed(_configs_differ, 2, tmp_path, timeout_s=120)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "the ranks hold different settings: optimizer.lr: 0.003 on rank 0, 0.01 on rank 1 (launch every rank "
            "with the same command line, config file and overrides)")


def _a_peer_stalls(rank: int, world_size: int, out_dir) -> None:
    import torch
    import torch.distributed as dist

    from megamath.parallel.state import ParallelState

    state = ParallelState.from_env(1, timeout_s=2)
    dist.barrier(group=state.world_group)
    if rank == 1:  # stalled (a hung filesystem, a stopped process) past the job's 2 s timeout, until rank 0 has
        deadline = time.monotonic() + 8  # its error, or 8 s: a group on torch's 30-minute default waits them out
        while not (out_dir / "line.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=state.dp_group)  # a group of its own, not the default one
        line = "no error"
    except RuntimeError as err:
        line = str(lost_peer(err))
    (out_dir / "line.txt").write_text(f"{time.monotonic() - start:.1f}\n{line}")
    os._exit(0)  # the process group cannot be torn down cleanly without its peer


def test_the_data_parallel_group_times_out_as_the_job_does_and_says_so_in_one_line(tmp_path):
    run_distributed(_a_peer_stalls, 2, tmp_path, timeout_s=120)
    waited, line = (tmp_path / "line.txt").read_text().split("\n", 1)
    assert float(waited) < 6, f"waited {waited} s: the group took torch's 30-minute default, not the job's 2 s"
    assert line.startswith("rank 0 timed out in a collective (") and "another rank stopped answering" in line, line
    assert line.endswith("needs a longer parallel.timeout_minutes") and "\n" not in line


def test_the_training_configs_timeout_is_the_groups(tmp_path, monkeypatch, one_thread):
    """parallel.timeout_minutes (Megatron-LM's --distributed-timeout-minutes) reaches the process groups; the
    10-minute timeout was fixed, and a rank 0 that builds a large blend's index for longer stopped the job."""
    import yaml

    from megamath.cli import main
    from megamath.parallel.state import ParallelState
    from test_train_loop import raw_config

    asked = {}

    def single(cls, tp_size=1, **options):
        asked.update(options)
        return ParallelState.single()

    monkeypatch.setattr(ParallelState, "from_env", classmethod(single))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw_config(tmp_path / "data", tmp_path / "run", train_steps=1)))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "parallel.timeout_minutes=45"]) == 0
    assert asked["timeout_s"] == 45 * 60
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "run_dir=" + str(tmp_path / "b")]) == 0
    assert asked["timeout_s"] == 10 * 60  # the default, Megatron-LM's too


def _hold(rank: int, world_size: int, out_dir, run_dir: str, fault: str) -> None:
    from pathlib import Path

    from megamath.parallel.state import ParallelState
    from megamath.training import checkpoint as ckpt
    from megamath.training.run_guard import hold_run_dir

    state = ParallelState.from_env(1)
    if rank == 1 and fault == "elsewhere":  # a relative run_dir, another working directory (or a node-local disk)
        os.makedirs(out_dir / "rank1_cwd", exist_ok=True)
        os.chdir(out_dir / "rank1_cwd")
    if rank == 1 and fault == "read-only":  # as a read-only mount answers on that node (root here ignores modes)
        def refuse(root):
            raise OSError(f"cannot write checkpoints in {root} (Read-only file system): the run would lose its steps")
        ckpt.check_writable = refuse
    try:
        with hold_run_dir(Path(run_dir), state) as attempt:
            (out_dir / f"rank{rank}.txt").write_text(f"held {attempt}")
    except OSError as err:
        (out_dir / f"rank{rank}.txt").write_text(str(err))


@pytest.mark.parametrize("fault", ["none", "elsewhere", "read-only"])
def test_every_rank_must_see_and_write_rank_0s_run_dir_before_the_first_step(tmp_path, monkeypatch, fault):
    monkeypatch.chdir(tmp_path)
    run_distributed(_hold, 2, tmp_path, "run", fault, timeout_s=120)
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    if fault == "none":
        assert lines[0] == lines[1] and lines[0].startswith("held ")  # one attempt id on every rank
    elif fault == "elsewhere":
        assert lines[0] == lines[1] == (
            "rank 1 does not see rank 0's run directory: run there holds no lock file of this job (a node-local disk, "
            "or a relative run_dir from another working directory?); every rank writes its share of each checkpoint "
            "into one folder, so run_dir must be one folder on a filesystem all ranks share")
    else:
        assert lines[0] == lines[1] == ("rank 1: cannot write checkpoints in run (Read-only file system): the run "
                                        "would lose its steps")
    assert not (tmp_path / "run" / ".megamath.lock").exists()  # released on rank 0, refused or not


def _train_data(rank: int, world_size: int, out_dir) -> None:
    from megamath.parallel.state import ParallelState
    from megamath.training.config import TrainConfig
    from megamath.training.data import TrainData
    from test_train_loop import raw_config

    state = ParallelState.from_env(1)
    os.chdir(out_dir / f"node{rank}")  # the same relative prefixes, each node its own copy
    raw = raw_config(out_dir / "node0" / "d", out_dir / "run")
    raw["data"]["data_path"] = [1, "d/arxiv", 2, "d/web"]
    raw["data"]["valid_data"] = {"arxiv": "d/arxiv"}
    try:
        TrainData(TrainConfig.from_dict(raw), state, None)
        (out_dir / f"rank{rank}.txt").write_text("same")
    except ValueError as err:
        (out_dir / f"rank{rank}.txt").write_text(str(err))


@pytest.mark.parametrize("stale", [False, True])
def test_a_node_with_another_copy_of_the_data_is_refused(tmp_path, stale):
    from test_train_loop import write_corpus

    write_corpus(tmp_path / "node0" / "d")
    shutil.copytree(tmp_path / "node0", tmp_path / "node1")
    if stale:  # node 1's web dataset is another one under the same name
        for suffix in (".bin", ".idx"):
            shutil.copy(tmp_path / "node1" / "d" / f"arxiv{suffix}", tmp_path / "node1" / "d" / f"web{suffix}")
    run_distributed(_train_data, 2, tmp_path, timeout_s=120)
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    if not stale:
        assert lines == ["same", "same"]
        return
    assert lines[0] == lines[1]
    assert lines[0].startswith("the ranks hold different data (the SHA-256 of each dataset's .idx, and its .bin "
                               "size): d/web: '") and lines[0].endswith(
        "on rank 1 (give every node the same copy of the datasets)"), lines[0]


def _find(rank: int, world_size: int, out_dir) -> None:
    from megamath.parallel.state import ParallelState
    from megamath.training import resume

    state = ParallelState.from_env(1)
    if rank == 1:  # a stale directory listing on this node: it saw no checkpoint
        resume._candidates = lambda root: ([], None)
    found = resume.find_resume_checkpoint("auto", out_dir / "run", state, print)
    (out_dir / f"rank{rank}.txt").write_text(str(found))


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path, one_thread):
    from test_train_loop import raw_config, run

    run(raw_config(tmp_path / "data", tmp_path / "run"))
    run_distributed(_find, 2, tmp_path, timeout_s=120)
    found = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert found == [str(tmp_path / "run" / "checkpoints" / "step_0000008")] * 2


def _generate(rank: int, world_size: int, out_dir, model: str, tokenizer: str) -> None:
    import contextlib
    import io

    from megamath.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["generate", "--model", model, "--tokenizer-model", tokenizer, "--prompts",
                       str(out_dir / "p.jsonl"), "--output", str(out_dir / "out.jsonl"), "--max-new-tokens", "4",
                       "--seed", str(rank)])  # one node's launch line says another seed
    (out_dir / f"rank{rank}.txt").write_text(f"{status}\n{err.getvalue()}")


def test_generate_ranks_launched_with_other_flags_stop_before_decoding(tmp_path):
    from generation_fixtures import build_checkpoint, build_tokenizer

    model, tokenizer = build_checkpoint(tmp_path / "ckpt"), build_tokenizer(tmp_path / "tok.model")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1 + 1 ="}\n')
    run_distributed(_generate, 2, tmp_path, str(model), str(tokenizer), timeout_s=120)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "2\nmegamath generate: error: the ranks hold different settings: seed: '0' on rank 0, '1' on rank 1 "
            "(launch every rank with the same command line, config file and overrides)\n")
    assert not (tmp_path / "out.jsonl").exists()
