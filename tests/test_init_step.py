"""init_step: a run that continues another run's weights at the step they were trained to.

Converted at iteration N, a Megatron-LM or GPT-NeoX run goes on in megamath at update N + 1: the same
learning rate and the samples it had not read yet. Here the other run is a megamath run, whose own steps
show what the continuation must do.
"""
from __future__ import annotations

import pytest

from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from megamath.training.data import TrainData
from megamath.training.loop import train
from test_train_loop import metrics, raw_config


def test_a_run_continued_at_init_step_has_the_full_runs_lr_samples_and_checkpoint_names(tmp_path, capsys):
    full = raw_config(tmp_path / "corpus", tmp_path / "full", train_steps=6, checkpoint__save_every=3)
    train(TrainConfig.from_dict(full), ParallelState.single())
    later = {**full, "run_dir": str(tmp_path / "later"), "init_from_hf": str(tmp_path / "full" / "checkpoints" /
                                                                             "step_0000003"), "init_step": 3}
    train(TrainConfig.from_dict(later), ParallelState.single())
    assert "init_step 3: continuing the run of " in capsys.readouterr().out
    ours, theirs = metrics(tmp_path / "later"), [r for r in metrics(tmp_path / "full") if r.get("step", 0) > 3]
    ours = [r for r in ours if "step" in r]
    assert [r["step"] for r in ours] == [4, 5, 6]
    assert [(r["lr"], r["consumed_samples"]) for r in ours] == [(r["lr"], r["consumed_samples"]) for r in theirs]
    assert sorted(p.name for p in (tmp_path / "later" / "checkpoints").glob("step_*")) == ["step_0000006"]
    # the samples of steps 4..6 are the full run's: the same blend, read from the same position
    data = TrainData(TrainConfig.from_dict(later), ParallelState.single(), None)
    reference = TrainData(TrainConfig.from_dict(full), ParallelState.single(), None)
    for step in (4, 6):
        for (tokens, _), (expected, _) in zip(data.micro_batches(step), reference.micro_batches(step)):
            assert tokens.equal(expected)


@pytest.mark.parametrize("top, message", [
    ({"init_step": 3}, "^init_step 3 needs init_from_hf: the weights trained to that step$"),
    ({"init_step": 8, "init_from_hf": "x"}, "^init_step 8 leaves no step to train: train_steps is 8 "),
    ({"init_step": -1, "init_from_hf": "x"}, "init_step"),
])
def test_bad_init_steps_are_one_line_errors(tmp_path, top, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**raw_config(tmp_path / "corpus", tmp_path / "run"), **top})
