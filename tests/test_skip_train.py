"""skip_train (Megatron-LM's --skip-train): the held-out losses of the run's starting point, with nothing trained
and nothing of the run rewritten."""
import json

import pytest
import torch

from distributed import run_distributed
from megamath.cli import main
from megamath.compat.megatron import convert_megatron
from megamath.parallel.state import ParallelState
from megamath.report.figures import held_out_series, loss_figure
from megamath.report.runs import load_run
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from test_config_from_megatron import _words
from test_train_loop import metrics, raw_config


def config(tmp_path, **top) -> TrainConfig:
    data = tmp_path / "data"
    raw = raw_config(data, tmp_path / "run", **{"eval_every": 4, "eval_batches": 2, **top})
    raw["data"]["test_data"] = {"web": str(data / "web")}
    return TrainConfig.from_dict(raw)


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != ".megamath.lock"}


def test_the_checkpoint_a_resume_takes_is_evaluated_as_the_run_evaluated_it(tmp_path, capsys):
    train(config(tmp_path), ParallelState.single())  # 8 steps: validation at 4 and 8, test after 8, saved at 8
    last = metrics(tmp_path / "run")[-1]
    before = snapshot(tmp_path / "run")
    result = train(config(tmp_path, skip_train=True), ParallelState.single())
    written = json.loads((tmp_path / "run" / "held_out_step0000008.json").read_text())
    assert result.step == 8 and written == result.summary
    assert written["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)  # the same weights, the same samples
    assert written["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert written["source"].endswith("step_0000008")
    after = snapshot(tmp_path / "run")
    assert {k: v for k, v in after.items() if not k.startswith("held_out_")} == before  # nothing else changed
    out = capsys.readouterr().out
    assert "skip_train: the held-out losses of" in out and "  test/web " in out and "perplexity" in out


def test_a_fresh_run_evaluates_its_initial_weights_and_writes_no_checkpoint(tmp_path):
    result = train(config(tmp_path, skip_train=True), ParallelState.single())
    assert result.step == 0 and result.summary["source"] == "the random initialization (seed 1234)"
    assert set(result.summary["val_loss"]) == {"arxiv"} and set(result.summary["test_loss"]) == {"web"}
    assert not list((tmp_path / "run").glob("checkpoints/step_*")) and not (tmp_path / "run" / "metrics.jsonl").exists()
    # then training from there starts at step 1 as if nothing had run
    train(config(tmp_path), ParallelState.single())
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 9))
    # and the report draws the starting point before the validation losses of steps 4 and 8
    run = load_run(tmp_path / "run")
    steps, losses = held_out_series(run, "val_loss", "arxiv")
    assert steps == [0, 4, 8] and losses[0] == result.summary["val_loss"]["arxiv"]
    assert held_out_series(run, "test_loss", "web")[0] == [0, 8] and len(loss_figure([run])) == 1


def test_a_malformed_held_out_record_is_named_by_the_report(tmp_path):
    train(config(tmp_path, train_steps=1, eval_every=1), ParallelState.single())
    (tmp_path / "run" / "held_out_step0000000.json").write_text('{"step": 0, "val_loss": {"arxiv": "low"}}')
    with pytest.raises(ValueError, match=r"held_out_step0000000.json: val_loss must map each set to a loss or null"):
        load_run(tmp_path / "run")


def test_skip_train_needs_something_to_evaluate(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run", skip_train=True)
    raw["data"]["valid_data"] = {}
    with pytest.raises(ValueError, match="skip_train evaluates the held-out sets, and this config has none"):
        TrainConfig.from_dict(raw)
    with pytest.raises(ValueError, match="skip_train must be"):
        TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "run", skip_train="yes"))


def test_the_cli_and_megatrons_flag(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw_config(tmp_path / "data", tmp_path / "run")))
    assert main(["train", "--config", str(path), "skip_train=true"]) == 0
    assert "val/arxiv" in capsys.readouterr().out and (tmp_path / "run" / "held_out_step0000000.json").exists()
    conversion = convert_megatron(_words("--skip-train"), vocab_size=32000, world_size=32)
    assert conversion.validate().skip_train and "--skip-train" not in {u.key for u in conversion.unmapped}


def _dp2_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    train(config(tmp, skip_train=True, micro_batch_size=1), ParallelState.from_env(1))


def test_two_dp_ranks_give_the_losses_of_one(tmp_path):
    """Each rank evaluates half of every set's fixed samples; the mean over ranks is DP 1's over all of them."""
    raw_config(tmp_path / "data", tmp_path / "unused")  # the corpus, before the ranks start (they would race)
    run_distributed(_dp2_worker, 2, tmp_path)
    two = json.loads((tmp_path / "run" / "held_out_step0000000.json").read_text())
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "data").symlink_to(tmp_path / "data")  # the same corpus
    one = train(config(tmp_path / "one", skip_train=True, micro_batch_size=1, eval_batches=4),
                ParallelState.single()).summary
    for key in ("val_loss", "test_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5)


def test_a_checkpoint_of_another_run_is_evaluated_from_a_folder_of_its_own(tmp_path):
    """A training run's folder is locked while it trains: its checkpoints are evaluated from another run_dir,
    checkpoint.resume naming the step."""
    train(config(tmp_path), ParallelState.single())
    at_4 = metrics(tmp_path / "run")[3]["val_loss"]
    step_4 = tmp_path / "run" / "checkpoints" / "step_0000004"
    raw = raw_config(tmp_path / "data", tmp_path / "eval", eval_every=4, eval_batches=2, skip_train=True)
    raw["checkpoint"]["resume"] = str(step_4)
    result = train(TrainConfig.from_dict(raw), ParallelState.single())
    assert result.step == 4 and result.summary["val_loss"] == pytest.approx(at_4, rel=1e-6)
    assert (tmp_path / "eval" / "held_out_step0000004.json").exists()
