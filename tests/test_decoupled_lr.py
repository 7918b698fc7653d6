"""optimizer.decoupled_lr (Megatron-LM's --decoupled-lr): the embedding and the LM head on a learning-rate schedule of
their own, recorded beside the others' in metrics.jsonl; the optimizer side is tests/test_zero.py's."""
import pytest
import torch

from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from megamath.training.schedule import decoupled_lr_at
from test_train_loop import metrics, raw_config, rewind


def test_a_run_records_and_applies_the_decoupled_schedule(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run", optimizer__decoupled_lr=1e-2,
                     optimizer__decoupled_min_lr=1e-3)
    config = TrainConfig.from_dict(raw)
    train(config, ParallelState.single())
    records = metrics(tmp_path / "run")
    want = [decoupled_lr_at(s, config.optimizer.lr, 1e-2, 1e-3, config.schedule) for s in range(1, 9)]
    assert [r["decoupled_lr"] for r in records] == pytest.approx(want)
    assert all(r["decoupled_lr"] != r["lr"] for r in records)
    same = TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "plain"))
    train(same, ParallelState.single())
    assert "decoupled_lr" not in metrics(tmp_path / "plain")[0]
    embed = {run: torch.load(tmp_path / run / "checkpoints" / "step_0000008" / "optimizer_tp00_dp000.pt",
                             weights_only=True) for run in ("run", "plain")}
    assert not torch.equal(embed["run"]["master"], embed["plain"]["master"])  # another update


@pytest.mark.parametrize("optimizer, message", [
    ({"decoupled_min_lr": 1e-5}, "decoupled_min_lr is set but decoupled_lr is not"),
    ({"decoupled_lr": 1e-5, "decoupled_min_lr": 1e-4}, "decoupled_min_lr 0.0001 is above decoupled_lr 1e-05"),
    ({"decoupled_lr": 0}, r"decoupled_lr must be a learning rate in \(0, 1\] or null, got 0"),
    ({"decoupled_lr": float("inf")}, "decoupled_lr must be a learning rate"),
    ({"lr": 1e-3, "decoupled_lr": 1e-5}, r"optimizer.decoupled_lr 1e-05 is below the schedule's floor"),
])
def test_bad_decoupled_settings_are_one_line_errors(tmp_path, optimizer, message):
    raw = raw_config(tmp_path / "data", tmp_path / "run", **{f"optimizer__{k}": v for k, v in optimizer.items()})
    raw["schedule"]["min_lr_ratio"] = 0.1
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig.from_dict(raw)
    assert "\n" not in str(err.value)


def test_a_resume_that_sets_or_changes_it_says_so(tmp_path, capsys):
    train(TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "run")), ParallelState.single())
    rewind(tmp_path / "run", 4)
    capsys.readouterr()
    raw = raw_config(tmp_path / "data", tmp_path / "run", optimizer__decoupled_lr=1e-2)
    train(TrainConfig.from_dict(raw), ParallelState.single())
    assert "warning: optimizer.decoupled_lr None -> 0.01 since checkpoint step 4" in capsys.readouterr().out
