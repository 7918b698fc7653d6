"""ParallelState: TP-first rank layout over torchrun's environment, validation, the serial baseline."""
import json
import time

import pytest
import torch.distributed as dist

from distributed import run_distributed
from megamath.parallel.state import ParallelState, validate_sizes


def _report(rank, world_size, out_dir):
    for tp_size in (1, 2, 4):  # one launch, three layouts: each from_env call builds its own groups
        _report_layout(rank, tp_size, out_dir)


def _report_layout(rank, tp_size, out_dir):
    state = ParallelState.from_env(tp_size)
    tp_peers = [None] * state.tp_size
    dp_peers = [None] * state.dp_size
    dist.all_gather_object(tp_peers, rank, group=state.tp_group) if state.tp_group else tp_peers.__setitem__(0, rank)
    dist.all_gather_object(dp_peers, rank, group=state.dp_group) if state.dp_group else dp_peers.__setitem__(0, rank)
    info = dict(tp_rank=state.tp_rank, dp_rank=state.dp_rank, tp=tp_peers, dp=dp_peers)
    (out_dir / f"{tp_size}-{rank}.json").write_text(json.dumps(info))


def test_rank_layout_on_four_processes(tmp_path):
    run_distributed(_report, 4, tmp_path)
    for tp_size, rank in [(t, r) for t in (1, 2, 4) for r in range(4)]:
        info = json.loads((tmp_path / f"{tp_size}-{rank}.json").read_text())
        first = rank - rank % tp_size
        assert info["tp"] == list(range(first, first + tp_size))
        assert info["dp"] == list(range(rank % tp_size, 4, tp_size))
        assert (info["tp_rank"], info["dp_rank"]) == (rank % tp_size, rank // tp_size)


def test_validation():
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide the world size 4"):
        validate_sizes(4, 3)
    with pytest.raises(ValueError, match="tensor parallel size must be >= 1, got 0"):
        validate_sizes(4, 0)


def test_single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = ParallelState.from_env(1)
    assert (state.world_size, state.tp_size, state.dp_size, state.tp_group, state.dp_group) == (1, 1, 1, None, None)
    assert not state.is_distributed
    with pytest.raises(ValueError, match="needs a distributed launch"):
        ParallelState.from_env(2)


def _hang(rank, world_size):
    if rank == 1:
        time.sleep(3600)  # a rank that never returns: without the harness' deadline the suite would hang


def test_harness_kills_a_hung_launch():
    with pytest.raises(TimeoutError, match="_hang on 2 processes did not finish in 5 s"):
        # Long enough for rank 0 to start and finish on a loaded machine (measured with load 5 on 2 cores:
        # done ~3 s after the launch), so the deadline meets one finished rank and one hung, as in a real hang.
        run_distributed(_hang, 2, timeout_s=5)
