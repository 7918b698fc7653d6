"""init_from_hf naming a megamath training run or step folder: its weights at step 0, a fresh optimizer, its
special-token record carried on (Megatron-LM's --finetune for megamath's own checkpoints)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megamath.cli import main
from megamath.parallel.state import ParallelState
from megamath.training import loop
from megamath.training.checkpoint import CheckpointIntegrityError, read_metadata
from megamath.training.config import TrainConfig
from test_train_loop import metrics, raw_config, run


def stage(tmp_path, name: str, **top) -> dict:
    return raw_config(tmp_path / "data", tmp_path / name, **{"train_steps": 4, **top})


def test_a_second_stage_starts_from_the_first_stages_weights_at_step_zero(tmp_path):
    run(stage(tmp_path, "one"))
    first = tmp_path / "one" / "checkpoints" / "step_0000004"
    for source in (tmp_path / "one", first):  # a run directory (its latest) or one step folder
        config = TrainConfig.from_dict(stage(tmp_path, "two", init_from_hf=str(source)))
        model = loop.build_model(config, ParallelState.single())
        saved = load_file(str(first / "model_tp00.safetensors"))
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), saved[name]), name
    result = run(stage(tmp_path, "two", init_from_hf=str(tmp_path / "one"), optimizer__lr=1e-3))
    assert result.step == 4 and [r["step"] for r in metrics(tmp_path / "two")] == [1, 2, 3, 4]
    optimizer = torch.load(tmp_path / "two" / "checkpoints" / "step_0000004" / "optimizer_tp00_dp000.pt",
                           weights_only=True)
    assert optimizer["step"] == 4  # Adam restarted: four updates of its own, not eight
    # the first stage's loss had fallen; the second starts about where it ended, not at a random init's
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    fresh = metrics_of_fresh_run(tmp_path)
    assert abs(two[0]["loss"] - one[-1]["loss"]) < abs(fresh[0]["loss"] - one[-1]["loss"])


def metrics_of_fresh_run(tmp_path) -> list[dict]:
    run(stage(tmp_path, "fresh"))
    return metrics(tmp_path / "fresh")


def test_the_special_token_record_is_carried_to_the_second_stage(tmp_path):
    run(stage(tmp_path, "one"))
    assert main(["convert", "megamath-to-hf", str(tmp_path / "one"), str(tmp_path / "hf")]) == 0
    generation = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))
    run(stage(tmp_path, "two", init_from_hf=str(tmp_path / "hf")))  # records the folder's ids
    run(stage(tmp_path, "three", init_from_hf=str(tmp_path / "two")))
    two = read_metadata(tmp_path / "two" / "checkpoints" / "step_0000004")["hf_extras"]
    three = read_metadata(tmp_path / "three" / "checkpoints" / "step_0000004")["hf_extras"]
    assert three == two and two["generation_config"]["temperature"] == 0.7


def test_another_shape_is_refused_naming_it(tmp_path):
    run(stage(tmp_path, "one"))
    wider = stage(tmp_path, "two", init_from_hf=str(tmp_path / "one"))
    wider["model"]["ffn_hidden_size"] = 96
    with pytest.raises(ValueError, match=r"^init_from_hf: .*step_0000004 holds a model of another shape than this "
                                         r"run's: ffn_hidden_size 64 \(checkpoint\) vs 96 \(this run\)$"):
        loop.build_model(TrainConfig.from_dict(wider), ParallelState.single())


def test_a_damaged_checkpoint_is_not_trained_from(tmp_path):
    run(stage(tmp_path, "one"))
    path = tmp_path / "one" / "checkpoints" / "step_0000004" / "model_tp00.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    config = TrainConfig.from_dict(stage(tmp_path, "two", init_from_hf=str(tmp_path / "one")))
    with pytest.raises(CheckpointIntegrityError, match=r"model_tp00.safetensors has sha256 .* \(its contents changed "
                                                       r"after it was saved\)"):
        loop.build_model(config, ParallelState.single())


def test_a_second_stage_resumes_after_the_first_stage_is_gone(tmp_path):
    """A resume overwrites every weight, so init_from_hf's source is not read again (nor needed)."""
    run(stage(tmp_path, "one"))
    run(stage(tmp_path, "two", init_from_hf=str(tmp_path / "one")))
    shutil.rmtree(tmp_path / "one")
    assert run(stage(tmp_path, "two", init_from_hf=str(tmp_path / "one"), train_steps=6)).step == 6
    assert [r["step"] for r in metrics(tmp_path / "two")] == [1, 2, 3, 4, 5, 6]


def test_a_run_whose_latest_is_gone_is_named_as_init_from_hf(tmp_path):
    run(stage(tmp_path, "one"))
    (tmp_path / "one" / "checkpoints" / "step_0000004").rename(tmp_path / "one" / "checkpoints" / "step_0000004.corrupt")
    config = TrainConfig.from_dict(stage(tmp_path, "two", init_from_hf=str(tmp_path / "one")))
    with pytest.raises(ValueError, match=r"^init_from_hf: .*latest names step_0000004, which is not a complete "
                                         r"checkpoint[^;]*$"):
        loop.build_model(config, ParallelState.single())
