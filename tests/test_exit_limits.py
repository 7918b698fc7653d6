"""Stopping a run on purpose before train_steps: `exit_every` (Megatron-LM's --exit-interval) and
`exit_after_minutes` (--exit-duration-in-mins). Each saves at the end of its step and exits 0, as a preemption
does, and the next job resumes exactly where one uninterrupted run goes."""
from __future__ import annotations

import time

import pytest
import torch

from distributed import run_and_load
from megamath.cli import main
from megamath.parallel.state import ParallelState
from megamath.training import loop
from megamath.training.checkpoint import latest_checkpoint
from megamath.training.config import TrainConfig
from megamath.training.preemption import StopFlag
from test_train_loop import assert_bitwise_equal, final_state, metrics, one_thread, raw_config, run  # noqa: F401


def test_exit_every_cuts_a_run_into_jobs_that_end_where_one_run_ends(tmp_path, one_thread, capsys):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=8, checkpoint__save_every=100, exit_every=3)
    checkpoints = tmp_path / "run" / "checkpoints"
    for stop in (3, 6):
        result = run(raw)
        assert (result.step, result.preempted) == (stop, True)
        assert f"stopping on exit_every 3 after step {stop}: checkpoint saved to {checkpoints / f'step_{stop:07d}'}\n" \
            in capsys.readouterr().out
        assert latest_checkpoint(tmp_path / "run").name == f"step_{stop:07d}"
    result = run(raw)  # the last job reaches train_steps: no stop of its own at 9, which is past the end
    assert (result.step, result.preempted) == (8, False) and "stopping on" not in capsys.readouterr().out
    straight = raw_config(tmp_path / "data", tmp_path / "straight", train_steps=8, checkpoint__save_every=100)
    run(straight)
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 9))
    assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in metrics(tmp_path / "straight")]
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(tmp_path / "straight", 8))


def test_the_time_limit_saves_and_stops_at_the_end_of_the_step_that_reaches_it(tmp_path, monkeypatch, one_thread,
                                                                              capsys):
    """The clock as the flag reads it: each step takes 0.4 minutes, so a 1-minute limit is reached at the end of
    step 3 (1.2 minutes), whatever this machine's speed; the check after step 2's save does not stop it."""
    steps = {"n": 0}
    train_step = loop.train_step

    def counted_step(*args, **kwargs):
        steps["n"] += 1
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", counted_step)
    monkeypatch.setattr(StopFlag, "elapsed_minutes", lambda self: 0.4 * steps["n"])
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=8, checkpoint__save_every=2,
                     exit_after_minutes=1)
    result = run(raw)
    assert (result.step, result.preempted) == (3, True)
    out = capsys.readouterr().out
    assert (f"stopping on the time limit (exit_after_minutes 1: 1.2 min since the start) after step 3: checkpoint "
            f"saved to {tmp_path / 'run' / 'checkpoints' / 'step_0000003'}\n") in out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]


def test_the_flag_reads_the_monotonic_clock_from_the_trainings_start():
    single = ParallelState.single()
    assert not StopFlag(1.0, started=time.monotonic() - 50).agreed(single)
    late = StopFlag(1.0, started=time.monotonic() - 61)
    assert late.agreed(single) and late.reason.startswith("the time limit (exit_after_minutes 1: 1.0 min since")
    assert not StopFlag(0.0, started=time.monotonic() - 1e6).agreed(single)  # 0: no limit


def _agree(rank, world_size, out_dir):
    """Rank 0 started over a minute ago, rank 1 now (a start-up skew): both stop, each saying why; then a
    signal on rank 1 outranks rank 0's time limit."""
    state = ParallelState.from_env(1)
    flag = StopFlag(1.0, started=time.monotonic() - (61 if rank == 0 else 0))
    first = (flag.agreed(state), flag.reason)
    fresh = StopFlag(1.0, started=time.monotonic() - (61 if rank == 0 else 0))
    if rank == 1:
        fresh.signal_name = "SIGUSR1"
    second = (fresh.agreed(state), fresh.reason)
    quiet = StopFlag(1.0)
    torch.save({"time": first, "signal": second, "quiet": quiet.agreed(state)}, out_dir / f"rank{rank}.pt")


def test_every_rank_stops_at_the_step_the_first_rank_reaches_its_limit(tmp_path):
    ranks = run_and_load(_agree, 2, tmp_path)
    assert ranks[0]["time"][0] and ranks[0]["time"][1].startswith("the time limit (exit_after_minutes 1: 1.0 min since")
    assert ranks[1]["time"] == (True, "the time limit (exit_after_minutes 1: reached on another rank)")
    assert ranks[0]["signal"] == (True, "a peer rank’s signal") and ranks[1]["signal"] == (True, "SIGUSR1")
    assert not ranks[0]["quiet"] and not ranks[1]["quiet"]


@pytest.mark.parametrize("key, value, message", [
    ("exit_after_minutes", -1, "exit_after_minutes must be a number of minutes >= 0 (0: no limit), got -1.0"),
    ("exit_after_minutes", ".inf", "exit_after_minutes must be a number of minutes >= 0 (0: no limit), got inf"),
    ("exit_after_minutes", "soon", "exit_after_minutes must be float, got 'soon'"),  # the schema's own check
    ("exit_every", -2, "exit_every must be an integer >= 0, got -2"),
])
def test_bad_limits_are_one_line_errors(tmp_path, capsys, key, value, message):
    import yaml

    raw = raw_config(tmp_path / "data", tmp_path / "run")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert err == f"megamath train: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_limits_are_config_keys_with_defaults_off(tmp_path):
    config = TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "run"))
    assert (config.exit_every, config.exit_after_minutes) == (0, 0.0)
