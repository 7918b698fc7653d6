"""A rank whose collective fails because another rank died says so in one line (megamath.parallel.peer_failure)."""
from __future__ import annotations

import os

import pytest

from distributed import run_distributed
from megamath.cli import main
from megamath.commands import inspect as inspect_command
from megamath.parallel.peer_failure import lost_peer


def _one_rank_dies(rank: int, world_size: int, out_dir) -> None:
    import torch
    import torch.distributed as dist

    from megamath.parallel.state import ParallelState

    state = ParallelState.from_env(tp_size=1)
    dist.barrier(group=state.world_group)
    if rank == 1:
        os._exit(0)  # gone without a word, as a killed rank is
    try:
        for _ in range(50):  # the first may still find the peer's socket open
            dist.all_reduce(torch.ones(4), group=state.world_group)
    except RuntimeError as err:
        (out_dir / "line.txt").write_text(str(lost_peer(err)))
        os._exit(0)  # the process group cannot be torn down cleanly without its peer
    (out_dir / "line.txt").write_text("no error")


def test_a_real_gloo_failure_after_a_peer_died_is_told_in_one_line(tmp_path):
    run_distributed(_one_rank_dies, 2, tmp_path, timeout_s=120)
    line = (tmp_path / "line.txt").read_text()
    assert line.startswith("rank 0 lost a peer in a collective (") and "by peer" in line, line
    assert line.endswith("): another rank failed or was killed first, and its own error (or torchrun's summary of "
                         "the failed ranks) names the cause") and "\n" not in line and "GLHF" not in line, line


GLOO = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46246. "
        "This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting "
        "an error. GLHF! 🏖️")


class DistBackendError(RuntimeError):
    """Named as torch.distributed's is (NCCL's watchdog raises it when it aborts a communicator)."""


@pytest.mark.parametrize("err, expected", [
    (RuntimeError(GLOO), "lost a peer in a collective (Connection closed by peer [127.0.0.1]:46246): another"),
    (DistBackendError("NCCL communicator was aborted on rank 3.\nmore"), "(NCCL communicator was aborted on rank 3.)"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), None),
    (ValueError("Connection closed by peer"), None),
])
def test_only_a_lost_peer_is_recognised(monkeypatch, err, expected):
    monkeypatch.setenv("RANK", "5")
    line = lost_peer(err)
    assert (line is None) if expected is None else (line.startswith("rank 5 ") and expected in line), line


def test_the_cli_prints_one_line_for_a_lost_peer_and_a_traceback_for_anything_else(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    for err in (RuntimeError(GLOO), RuntimeError("a bug")):
        monkeypatch.setattr(inspect_command, "run", lambda args, err=err: (_ for _ in ()).throw(err))
        if "bug" in str(err):
            with pytest.raises(RuntimeError, match="a bug"):
                main(["inspect", "anything"])
            continue
        assert main(["inspect", "anything"]) == 1
        assert capsys.readouterr().err == (
            "megamath inspect: error: this process lost a peer in a collective (Connection closed by peer "
            "[127.0.0.1]:46246): another rank failed or was killed first, and its own error (or torchrun's summary "
            "of the failed ranks) names the cause\n")
