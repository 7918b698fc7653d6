"""data.split (Megatron-LM's --split): the cut itself against Megatron-LM's rule, what training reads from each
part, the test loss at the last step, and the errors of a split that cannot work."""
import functools
import json

import numpy as np
import pytest
import torch

from distributed import run_distributed

from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.data.splits import canonical_split, cut_splits, parse_split, part_names, split_documents
from megamath.parallel.state import ParallelState
from megamath.report.figures import loss_figure, score_figure
from megamath.report.runs import load_run
from megamath.training.config import TrainConfig
from megamath.training.data import TrainData
from megamath.training.loop import train
from megamath.training.resume import data_order_change
from test_train_loop import raw_config


def megatron_rule(num_documents: int, shares: list[float]) -> list[tuple[int, int] | None]:
    """Megatron-LM's cut as its builder states it: running sums of the normalized shares, a zero-width part
    dropped, each bound round(fraction · N)."""
    total = sum(shares)
    normalized = [s / total for s in shares] + [0.0] * (3 - len(shares))
    running = functools.reduce(lambda acc, s: acc + [acc[-1] + s], normalized, [0.0])
    return [None if hi <= lo else (int(round(lo * num_documents)), int(round(hi * num_documents)))
            for lo, hi in zip(running[:-1], running[1:])]


@pytest.mark.parametrize("shares", [[969, 30, 1], [99, 1], [98, 2, 0], [1, 1], [8, 1, 1], [100], [0.7, 0.2, 0.1],
                                    [949, 50, 1], [1, 0, 1]])
def test_parts_are_megatrons_at_every_size(shares):
    for n in list(range(1, 60)) + [999, 1000, 1001, 12345, 2**20 + 7]:
        got = split_documents(n, ",".join(str(s) for s in shares))
        for ids, bounds in zip(got, megatron_rule(n, shares)):
            if bounds is None:
                assert ids is None
            else:
                np.testing.assert_array_equal(ids, np.arange(*bounds))
        kept = np.concatenate([ids for ids in got if ids is not None])
        np.testing.assert_array_equal(kept, np.arange(n))  # in order, each document once


def test_worked_examples():
    train, valid, test = split_documents(1000, "969, 30, 1")
    assert (train[0], train[-1] + 1, valid[0], valid[-1] + 1, test[0], test[-1] + 1) == (0, 969, 969, 999, 999, 1000)
    train, valid, test = split_documents(5, "1,1")  # 2.5 rounds to even: 2, as Python's round does in Megatron-LM
    assert (train.tolist(), valid.tolist(), test) == ([0, 1], [2, 3, 4], None)
    train, valid, test = split_documents(10, [969, 30, 1])  # few documents: the held-out parts are empty
    assert len(train) == 10 and len(valid) == 0 and len(test) == 0


@pytest.mark.parametrize("split, message", [
    ("a,b", "'a' is not a number"), ("1,2,3,4", "give 1 to 3 shares"), ("0,1", "gives training no documents"),
    ("-1,2", "finite and >= 0"), ("1,nan", "finite and >= 0"), ("", "'' is not a number"), (True, "a string such as"),
    ({"train": 1}, "a string such as")])
def test_bad_splits_get_one_line_errors(split, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_split(split)
    assert "\n" not in str(err.value) and str(err.value).startswith("data.split")


def test_the_written_split_keeps_every_digit():
    """A share rounded when written would move a bound: 2,000,001 documents of 3,000,001 train, as Megatron-LM's."""
    split = canonical_split("66.6666667,33.3333333")
    assert split == "66.6666667,33.3333333" and len(split_documents(3000001, split).train) == 2000001
    assert canonical_split("1.0000004,1") == "1.0000004,1" and len(split_documents(5, "1.0000004,1").train) == 3


def test_a_prefix_listed_twice_has_one_held_out_set():
    sources = [type("Sizes", (), {"sizes": np.full(10, 100, dtype=np.int32)})()] * 2
    cut = cut_splits(sources, ["d/x_text_document"] * 2, "8,1,1", 32)
    assert list(cut.valid) == list(cut.test) == ["x"] and len(cut.train) == 2


def test_one_spelling_of_each_split():
    assert canonical_split("969, 30, 1") == canonical_split([969, 30, 1]) == canonical_split("969/30/1") == "969,30,1"
    assert canonical_split(100) == "100" and canonical_split("99.5, .5") == "99.5,0.5"
    assert parse_split("98/2") == (0.98, 0.02, 0.0)


def test_part_names_are_short_and_unique():
    prefixes = ["d/arxiv_train_text_document", "e/arxiv_train_text_document", "d/web_text_document", "d/code"]
    assert part_names(prefixes, taken=["code"]) == ["arxiv", "arxiv_train_text_document", "web", "d/code"]


# ---- training ------------------------------------------------------------------------------------------------

def tagged_corpus(directory) -> str:
    """40 documents whose tokens say which part of an 8,1,1 split they are in: the first 32 draw tokens from
    [0, 40), the next 4 from [40, 50), the last 4 from [50, 60)."""
    rng = np.random.default_rng(1)
    prefix = str(directory / "tagged_train_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in range(40):
            low, high = (0, 40) if doc < 32 else (40, 50) if doc < 36 else (50, 60)
            writer.add_document(rng.integers(low, high, size=int(rng.integers(20, 60))).astype(np.uint16))
    return prefix


def split_config(tmp_path, **top) -> TrainConfig:
    prefix = tagged_corpus(tmp_path)
    settings = {"data__data_path": [prefix], "data__valid_data": {}, "data__split": "8,1,1", "eval_every": 4,
                "eval_batches": 2, **top}
    raw = raw_config(tmp_path / "data", tmp_path / "run", **settings)
    return TrainConfig.from_dict(raw)


def test_training_reads_only_the_train_part_and_each_held_out_set_only_its_own(tmp_path):
    config = split_config(tmp_path, train_steps=30)
    data = TrainData(config, ParallelState.single(), None)
    trained = np.stack([data.train[i] for i in range(len(data.train))])
    assert trained.max() < 40 and len(np.unique(trained)) == 40  # every train token possible, no other
    assert list(data.valid) == ["tagged"] and list(data.test) == ["tagged"]
    valid = np.stack([data.valid["tagged"][i] for i in range(len(data.valid["tagged"]))])
    test = np.stack([data.test["tagged"][i] for i in range(len(data.test["tagged"]))])
    assert valid.min() >= 40 and valid.max() < 50 and test.min() >= 50
    assert data.split_lines[1].endswith("40 documents: train 32, valid 4, test 4 (reported as tagged)")


def test_run_reports_validation_parts_and_the_test_loss_once_at_the_end(tmp_path, capsys):
    config = split_config(tmp_path, train_steps=8)
    train(config, ParallelState.single())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert [r["step"] for r in records if "test_loss" in r] == [8]
    assert set(records[-1]["val_loss"]) == set(records[-1]["test_loss"]) == {"tagged"}
    out = capsys.readouterr().out
    assert "data.split 8,1,1: documents cut in order" in out and "  test/tagged " in out
    run = load_run(tmp_path / "run")  # the report draws the test loss with the losses, not as a score
    assert len(loss_figure([run])) == 1 and score_figure([run]) == []


def _dp2_split_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    train(split_config(tmp, train_steps=8, micro_batch_size=1), ParallelState.from_env(1))


def test_two_dp_ranks_report_the_held_out_losses_of_one(tmp_path):
    """DP 2 (each rank half of every held-out batch, the mean over ranks) against DP 1 with the same samples."""
    tagged_corpus(tmp_path)  # before the ranks start: they would race to write it
    run_distributed(_dp2_split_worker, 2, tmp_path)
    (tmp_path / "one").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(split_config(tmp_path / "one", train_steps=8, micro_batch_size=1, grad_accum_steps=2,
                           eval_batches=4), ParallelState.single())
    finally:
        torch.set_num_threads(threads)
    two, one = (json.loads((d / "run" / "metrics.jsonl").read_text().splitlines()[-1])
                for d in (tmp_path, tmp_path / "one"))
    for key in ("val_loss", "test_loss"):
        assert two[key].keys() == one[key].keys() == {"tagged"}
        np.testing.assert_allclose(two[key]["tagged"], one[key]["tagged"], rtol=1e-4)


def test_a_part_too_small_for_one_sample_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"data.split 8,1,1 gives the validation part of .*tagged_train_text_document "
                                         r"documents \[32, 36\) of its 40 documents, \d+ tokens: fewer than the "
                                         r"seq_length \+ 1"):
        TrainData(split_config(tmp_path, data__seq_length=512, model__max_seq_length=512), ParallelState.single(), None)
    sources = [type("Sizes", (), {"sizes": np.full(3, 100, dtype=np.int32)})()]
    with pytest.raises(ValueError, match=r"gives the validation part of x none of its 3 documents, 0 tokens.*\(0: no such part\)"):
        cut_splits(sources, ["x"], "969,30,1", 32)


def test_evaluation_needs_held_out_documents(tmp_path):
    with pytest.raises(ValueError, match=r"eval_every is 4 but data.valid_data is empty \(and no data.split holds"):
        split_config(tmp_path, data__split="9,0,1")
    assert split_config(tmp_path).data.has_validation()


def test_changing_the_split_on_resume_is_announced(tmp_path):
    config = split_config(tmp_path)
    saved = {"step": 4, "config": {**config.to_dict(), "data": {**config.to_dict()["data"], "split": None}}}
    assert "data.split None -> '8,1,1'" in data_order_change(saved, config)
    assert "documents trained on up to step 4 now lie in data.split's held-out parts" in data_order_change(saved, config)
    wider = {"step": 4, "config": {**config.to_dict(), "data": {**config.to_dict()["data"], "split": "6,2,2"}}}
    assert "held-out parts" not in data_order_change(wider, config)  # 6,2,2 -> 8,1,1: held-out documents only shrink
    assert data_order_change({"step": 4, "config": config.to_dict()}, config) is None


def test_validation_prefixes_are_opened_only_when_evaluation_is_on(tmp_path):
    """eval_every 0 leaves valid_data unread (a run may keep a config's sets it does not evaluate)."""
    config = split_config(tmp_path, eval_every=0, data__valid_data={"gone": str(tmp_path / "missing")})
    data = TrainData(config, ParallelState.single(), None)
    assert data.valid == {} and list(data.test) == ["tagged"]  # the test part is still taken at the end
