"""data.sample_order: megatron / neox reads that trainer's training samples in that trainer's order.

The cases and the digests of what Megatron-LM's and GPT-NeoX's own datasets built for them are in
megatron_order_cases.py; here megamath's TrainData builds the same setups and must give the same arrays
and, step by step, the same samples.
"""
from __future__ import annotations

import numpy as np
import pytest

from megamath.cli import main
from megamath.data import blending, megatron_order, sample_index
from megamath.data.gpt_dataset import GPTDataset
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.data.splits import split_documents
from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from megamath.training.data import TrainData
from megamath.training.loop import train
from megamath.training.resume import data_order_change
from megatron_order_cases import BUILT, CASES, blend_digests, digest, documents, gpt_digests
from test_train_loop import raw_config


def write_datasets(folder, case) -> list[str]:
    prefixes = []
    for k in case.datasets:
        prefixes.append(str(folder / f"dataset{k}"))
        with IndexedDatasetWriter(prefixes[-1], np.uint16) as writer:
            for tokens in documents(k):
                writer.add_document(tokens)
    return prefixes


def case_data(tmp_path, name: str, sample_order: str) -> TrainData:
    """TrainData of a case, one sample per step (so step s reads sample s - 1)."""
    case = CASES[name]
    prefixes = write_datasets(tmp_path, case)
    raw = raw_config(tmp_path / "corpus", tmp_path / "run", train_steps=case.num_samples, micro_batch_size=1,
                     data__data_path=case.data_path(prefixes), data__split=case.split, data__valid_data={},
                     data__seq_length=case.seq_length, data__seed=case.seed, data__sample_order=sample_order)
    return TrainData(TrainConfig.from_dict(raw), ParallelState.single(), None)


def trained_samples(data: TrainData, steps: int) -> np.ndarray:
    """(steps, seq_length + 1) the tokens each step trains on, read back from its micro-batch."""
    rows = []
    for step in range(1, steps + 1):
        (tokens, targets), = data.micro_batches(step)
        rows.append(np.concatenate([tokens[0].numpy(), targets[0, -1:].numpy()]))
    return np.stack(rows)


def digests(data: TrainData, name: str) -> dict[str, str]:
    """The keys BUILT holds for this case, from megamath's TrainData."""
    case = CASES[name]
    out = {"samples": digest(trained_samples(data, case.num_samples))}
    if case.weights is not None:  # the trainers read a lone unweighted prefix without a blend
        out.update(blend_digests(data.train.dataset_index, data.train.dataset_sample_index, case.num_samples))
    for k, gpt in enumerate(data.train.datasets):
        out.update(gpt_digests(k, gpt.doc_idx, gpt.sample_idx, gpt.shuffle_idx))
    return out


@pytest.mark.parametrize("name", CASES)
def test_training_reads_the_trainers_samples_in_its_order(tmp_path, name):
    assert digests(case_data(tmp_path, name, CASES[name].trainer), name) == BUILT[name]


@pytest.mark.parametrize("name", CASES)
def test_each_case_is_one_where_the_wrong_order_differs(tmp_path, name):
    """Else the test above would pass with a wrong order as well: megamath's own, and for GPT-NeoX's cases
    Megatron-LM's (several Megatron-LM cases are ones where GPT-NeoX's order happens to agree)."""
    for order in ("megamath", "megatron") if CASES[name].trainer == "neox" else ("megamath",):
        other = case_data(tmp_path / order, name, order)
        assert digest(trained_samples(other, CASES[name].num_samples)) != BUILT[name]["samples"], order


def test_the_cases_cover_what_they_say():
    sizes = np.array([len(d) for d in documents(0)])
    together, apart = CASES["one_prefix_epochs_together"], CASES["weighted_prefix_final_epoch_apart"]
    tokens = int(sizes.sum())
    assert sample_index.num_epochs_needed(tokens, 16, together.num_samples) == 3
    assert not megatron_order.separates_final_epoch(tokens, 16, together.num_samples, 3)
    with_surplus, = megatron_order.requested_samples([1.0], together.num_samples, "megatron")
    assert sample_index.num_epochs_needed(tokens, 16, with_surplus) == 4  # what a blend of one would build
    assert sample_index.num_epochs_needed(tokens, 16, apart.num_samples) == 2  # unblended it would be 2 epochs
    built, = megatron_order.requested_samples(apart.weights, apart.num_samples, "megatron")
    assert built == 56 and sample_index.num_epochs_needed(tokens, 16, built) == 3
    assert megatron_order.separates_final_epoch(tokens, 16, built, 3)


# ---- the arithmetic ---------------------------------------------------------------------------------------

def test_final_epoch_is_apart_below_80_percent_of_an_epochs_samples():
    tokens, seq_length = 161, 16  # 10 samples an epoch, 20 before a third epoch
    assert sample_index.samples_in(tokens, seq_length) == 10
    assert not megatron_order.separates_final_epoch(tokens, seq_length, 28, 3)  # 8 from the last = int(0.8 * 10)
    assert megatron_order.separates_final_epoch(tokens, seq_length, 27, 3)
    assert not megatron_order.separates_final_epoch(tokens, seq_length, 5, 1)


def test_epochs_shuffled_together_read_each_document_epochs_times_but_not_once_per_epoch():
    documents_ = np.arange(10, 30)
    doc_idx = megatron_order.build_doc_idx(documents_, 3, np.random.RandomState(0), separate_final=False)
    assert sorted(doc_idx.tolist()) == sorted(documents_.tolist() * 3)
    assert len(set(doc_idx[:20].tolist())) < 20  # a document comes twice before another comes once
    apart = megatron_order.build_doc_idx(documents_, 3, np.random.RandomState(0), separate_final=True)
    assert sorted(apart[40:].tolist()) == documents_.tolist()


def test_one_epoch_without_a_blend_is_the_same_in_both_orders(tmp_path):
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for tokens in documents(1):
            writer.add_document(tokens)
    dataset = IndexedDataset(prefix)
    ours, theirs = (GPTDataset(dataset, 30, 16, seed=3, sample_order=order) for order in ("megamath", "megatron"))
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_blend_sizes_are_each_trainers_with_its_surplus():
    assert megatron_order.requested_samples([3, 2, 5], 60, "megatron") == [19, 13, 31]
    assert megatron_order.requested_samples([3, 2, 5], 61, "megatron") == [20, 14, 32]  # ⌈⌈w·N⌉·1.005⌉
    assert megatron_order.requested_samples([3, 2, 5], 61, "neox") == [19, 13, 31]  # ⌈w·N·1.005⌉
    assert megatron_order.requested_samples([1], 55, "megatron", surplus=0.0) == [55]


def test_the_neox_cases_cover_what_they_say():
    train, valid, test = split_documents(25, "45,45,10", rule="neox")
    assert (train[-1], valid[-1], test[-1]) == (11, 22, 24)  # GPT-NeoX trains on [0, 12)
    assert split_documents(25, "45,45,10").train[-1] == 10  # Megatron-LM on [0, 11)
    tokens = sum(len(d) for d in documents(3))
    assert megatron_order.requested_samples([3, 2, 5], 59, "neox") == [18, 12, 30]
    assert sample_index.num_epochs_needed(tokens, 16, 30) == 3
    assert megatron_order.requested_samples([3, 2, 5], 59, "megatron")[2] == 31
    assert sample_index.num_epochs_needed(tokens, 16, 31) == 4
    tokens = sum(len(d) for d in documents(0))
    assert sample_index.num_epochs_needed(tokens, 16, 56) == 3
    assert megatron_order.separates_final_epoch(tokens, 16, 56, 3)  # Megatron-LM would, GPT-NeoX does not


@pytest.mark.parametrize("seed", range(5))
def test_megatron_blending_rule_in_cpp_matches_its_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    weights = rng.random(int(rng.integers(1, 6))) + 0.01
    for megatron_target in (False, True):
        fast = blending.build_blending_indices(weights, 500, megatron_target=megatron_target)
        ref = blending.build_blending_indices_ref(weights, 500, megatron_target=megatron_target)
        for a, b in zip(fast, ref):
            np.testing.assert_array_equal(a, b)
    assert blending.build_blending_indices([1, 3], 8, megatron_target=True)[0].tolist() == [1, 0, 1, 1, 0, 1, 1, 1]


# ---- config and resume ------------------------------------------------------------------------------------

def test_an_unknown_sample_order_is_one_line_naming_the_key(tmp_path):
    raw = raw_config(tmp_path / "corpus", tmp_path / "run", data__sample_order="nemo")
    with pytest.raises(ValueError, match=r"^data.sample_order must be one of megamath, megatron, neox, got 'nemo'$"):
        TrainConfig.from_dict(raw)


def test_changing_the_sample_order_on_resume_is_warned_and_an_older_checkpoint_counts_as_megamath(tmp_path):
    raw = raw_config(tmp_path / "corpus", tmp_path / "run")
    saved = TrainConfig.from_dict(raw).to_dict()
    meta = {"config": saved, "step": 4}
    assert data_order_change(meta, TrainConfig.from_dict(raw)) is None
    del saved["data"]["sample_order"]  # a checkpoint from before the key
    assert data_order_change(meta, TrainConfig.from_dict(raw)) is None
    changed = TrainConfig.from_dict({**raw, "data": {**raw["data"], "sample_order": "megatron"}})
    assert "data.sample_order 'megamath' -> 'megatron'" in data_order_change(meta, changed)


def test_cli_blend_in_megatrons_order_warms_the_cache_training_reads(tmp_path, capsys):
    """A lone prefix is read unblended (2 epochs for 55 samples), a weighted one as a blend of one built with the
    surplus (56 samples: 3 epochs); training then loads the indices `megamath blend` cached."""
    prefix, = write_datasets(tmp_path, CASES["weighted_prefix_final_epoch_apart"])
    common = ["--seq-length", "16", "--num-samples", "55", "--seed", "7", "--sample-order", "megatron"]
    assert main(["blend", "--data-path", prefix, *common]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-2:] == ["55", "2"]
    cache = tmp_path / "cache"
    assert main(["blend", "--data-path", "1", prefix, *common, "--cache-dir", str(cache), "--split", "100,0,0"]) == 0
    assert capsys.readouterr().out.splitlines()[3].split()[-2:] == ["55", "3"]
    built = {path: path.stat().st_mtime_ns for path in cache.iterdir()}
    case = CASES["weighted_prefix_final_epoch_apart"]
    raw = raw_config(tmp_path / "corpus", tmp_path / "run", train_steps=case.num_samples, micro_batch_size=1,
                     data__data_path=case.data_path([prefix]), data__split=case.split, data__valid_data={},
                     data__seq_length=16, data__seed=7, data__sample_order="megatron")
    data = TrainData(TrainConfig.from_dict(raw), ParallelState.single(), cache)
    assert {path: path.stat().st_mtime_ns for path in cache.iterdir()} == built  # nothing rebuilt
    assert digest(data.train.datasets[0].shuffle_idx) == BUILT["weighted_prefix_final_epoch_apart"]["shuffle_idx.0"]


def test_a_run_in_gpt_neoxs_order_trains_and_says_so(tmp_path, capsys):
    raw = raw_config(tmp_path / "corpus", tmp_path / "run", train_steps=2, data__sample_order="neox")
    train(TrainConfig.from_dict(raw), ParallelState.single())
    assert ("data.sample_order neox: the training samples come in GPT-NeoX's order for this blend, split, seed, "
            "seq_length and 2 steps × 2 samples") in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()
