"""data.test_data (Megatron-LM's --test-data-path, GPT-NeoX's test_data_paths): test sets named by prefix, each
evaluated once after the last step beside data.split's test parts, and the errors of sets that cannot be read."""
import json

import numpy as np
import pytest

from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.parallel.state import ParallelState
from megamath.training.config import DataConfig
from megamath.training.data import TrainData
from megamath.training.loop import train
from test_data_split import split_config


def other_corpus(directory, name: str = "other_test_text_document") -> str:
    """12 documents of tokens from [60, 64): no other dataset here holds them."""
    rng = np.random.default_rng(2)
    prefix = str(directory / name)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(12):
            writer.add_document(rng.integers(60, 64, size=int(rng.integers(20, 60))).astype(np.uint16))
    return prefix


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r]


def test_a_test_set_is_read_from_its_own_prefix_beside_the_split_s_test_part(tmp_path):
    config = split_config(tmp_path, train_steps=30, data__test_data={"other": other_corpus(tmp_path)})
    data = TrainData(config, ParallelState.single(), None)
    assert list(data.valid) == ["tagged"] and sorted(data.test) == ["other", "tagged"]
    other = np.stack([data.test["other"][i] for i in range(len(data.test["other"]))])
    tagged = np.stack([data.test["tagged"][i] for i in range(len(data.test["tagged"]))])
    assert other.min() >= 60 and tagged.min() >= 50 and tagged.max() < 60  # each set only its own documents


def test_the_test_loss_is_taken_once_after_the_last_step(tmp_path, capsys):
    config = split_config(tmp_path, train_steps=8, data__test_data={"other": other_corpus(tmp_path)})
    train(config, ParallelState.single())
    got = records(tmp_path / "run")
    assert [r["step"] for r in got if "test_loss" in r] == [8]
    assert set(got[-1]["test_loss"]) == {"other", "tagged"} and set(got[-1]["val_loss"]) == {"tagged"}
    assert all(np.isfinite(v) for v in got[-1]["test_loss"].values())
    assert "  test/other " in capsys.readouterr().out


def test_a_set_named_for_both_validation_and_test_is_the_same_loss_on_the_final_model(tmp_path):
    """The same prefix as a validation and a test set: the same fixed samples, so at the last step (an evaluation
    step too) both losses are of the final model and equal; the test set is no stale copy of an earlier model."""
    prefix = other_corpus(tmp_path)
    config = split_config(tmp_path, train_steps=8, data__split=None, data__valid_data={"other": prefix},
                          data__test_data={"other": prefix})
    train(config, ParallelState.single())
    last = records(tmp_path / "run")[-1]
    assert last["step"] == 8 and last["test_loss"] == last["val_loss"] == {"other": last["val_loss"]["other"]}
    assert records(tmp_path / "run")[3]["val_loss"]["other"] != last["test_loss"]["other"]  # the model moved


def test_the_split_s_parts_give_way_to_a_test_set_s_name(tmp_path):
    """test_data's names are the user's: a split part that would report under one of them takes its file name."""
    config = split_config(tmp_path, train_steps=30, data__test_data={"tagged": other_corpus(tmp_path)})
    data = TrainData(config, ParallelState.single(), None)
    assert list(data.valid) == ["tagged_train_text_document"]
    assert sorted(data.test) == ["tagged", "tagged_train_text_document"]
    assert np.stack([data.test["tagged"][i] for i in range(len(data.test["tagged"]))]).min() >= 60


def test_a_missing_test_set_stops_the_run_before_its_first_step(tmp_path):
    """Even without evaluation (the test loss is taken regardless): not after hours of training."""
    config = split_config(tmp_path, eval_every=0, data__test_data={"gone": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match=r"missing.* \(data prefixes are given without .bin/.idx\)"):
        TrainData(config, ParallelState.single(), None)


@pytest.mark.parametrize("test_data, message", [
    ("all", "data.test_data must be a mapping {name: prefix} or 'llemma', got 'all'"),
    (["a"], "data.test_data must be a mapping {name: prefix} or 'llemma', got ['a']"),
    ({"arxiv": None}, "data.test_data: set 'arxiv' has no prefix"),
    ({"arxiv": ""}, "data.test_data: set 'arxiv' has no prefix"),
])
def test_bad_test_data_is_a_one_line_error(test_data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        DataConfig(data_path=["d/x"], test_data=test_data)
    assert "\n" not in str(err.value)


def test_llemma_names_the_test_split_of_each_subset(tmp_path):
    data = DataConfig(data_path="llemma", data_dir="pp2", test_data="llemma")
    assert data.test_sets() == {s: f"pp2/{s}_test_text_document"
                                for s in ("arxiv", "open-web-math", "algebraic-stack")}
    with pytest.raises(ValueError, match="data.data_dir is needed to find the 'llemma' datasets"):
        DataConfig(data_path=["d/x"], test_data="llemma")
    assert DataConfig(data_path=["d/x"]).test_sets() == {}


def test_a_held_out_set_that_also_trains_is_announced(tmp_path, capsys):
    """Megatron-LM accepts a validation or test prefix that is also a training prefix; its loss is then of trained
    documents, which the run's log says, once, at the start."""
    config = split_config(tmp_path, train_steps=2, data__split=None, eval_every=0)
    trained = config.data.train_blend()[1][0]
    config = split_config(tmp_path, train_steps=2, data__split=None, eval_every=2,
                          data__valid_data={"seen": trained, "other": other_corpus(tmp_path)},
                          data__test_data={"seen_too": trained})
    train(config, ParallelState.single())
    out = capsys.readouterr().out
    assert f"warning: data.valid_data set 'seen' ({trained}) is also in data.data_path" in out
    assert f"warning: data.test_data set 'seen_too' ({trained}) is also in data.data_path" in out
    assert "'other'" not in out
