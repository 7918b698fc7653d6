"""BlendedDataset against independently built GPTDatasets, its shares and errors, and `megamath blend`."""
from __future__ import annotations

import numpy as np
import pytest

from megamath.cli import main
from megamath.data import blended_dataset
from megamath.data.blended_dataset import BlendedDataset, dataset_seed
from megamath.data.blending import build_blending_indices_ref
from megamath.data.gpt_dataset import GPTDataset
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter


def write_dataset(prefix, n_docs, seed, max_len=40) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(n_docs):
            writer.add_document(rng.integers(0, 50000, int(rng.integers(1, max_len))))
    return IndexedDataset(prefix)


@pytest.fixture
def three(tmp_path):
    return [write_dataset(tmp_path / name, n, seed) for name, n, seed in (("a", 30, 1), ("b", 12, 2), ("c", 50, 3))]


def test_samples_equal_the_underlying_gpt_samples(three):
    weights, num_samples, seq_length = [2.0, 4.0, 1.0], 150, 16
    blend = BlendedDataset(three, weights, num_samples, seq_length, seed=7)
    ref_index, ref_rank = build_blending_indices_ref(weights, num_samples)
    np.testing.assert_array_equal(blend.dataset_index, ref_index)
    counts = np.bincount(ref_index, minlength=3)
    # each dataset's GPTDataset is built independently here, for exactly the samples the blend needs
    alone = [GPTDataset(ds, int(c), seq_length, seed=dataset_seed(7, k)) for k, (ds, c) in enumerate(zip(three, counts))]
    assert len(blend) == num_samples
    for i in range(num_samples):
        d = int(ref_index[i])
        assert blend.dataset_of(i) == d
        np.testing.assert_array_equal(blend[i], alone[d][int(ref_rank[i])])
    # every sample of every underlying dataset is used exactly once
    for d in range(3):
        assert sorted(blend.dataset_sample_index[blend.dataset_index == d].tolist()) == list(range(counts[d]))
        assert len(blend.datasets[d]) == counts[d]
    with pytest.raises(IndexError, match=r"^sample 150 out of range for a blend of 150 samples$"):
        blend[150]


def test_dataset_seeds_differ_by_position():
    seeds = {dataset_seed(1234, k) for k in range(50)}
    assert len(seeds) == 50
    assert dataset_seed(1234, 3) == dataset_seed(1234, 3) != dataset_seed(1235, 3)


def test_realized_shares_follow_the_weights(three):
    weights = np.array([0.2, 0.5, 0.3])
    blend = BlendedDataset(three, weights * 10, 997, 8)
    shares = blend.realized_shares()
    assert abs(shares.sum() - 1.0) < 1e-12
    assert np.abs(shares - weights).max() <= 1.0 / 997 + 1e-12
    rows = blend.summary_rows()
    assert [r.name for r in rows] == [str(d.prefix) for d in three]
    assert [r.samples for r in rows] == blend.counts.tolist() and sum(r.samples for r in rows) == 997
    np.testing.assert_allclose([r.weight for r in rows], weights, rtol=1e-12)
    assert [r.epochs for r in rows] == [g.num_epochs for g in blend.datasets]
    assert all(r.epochs >= 1 for r in rows)


def test_negligible_weight_gets_no_samples(three):
    blend = BlendedDataset(three, [1.0, 1e-9, 1.0], 40, 8)
    assert blend.counts[1] == 0 and blend.datasets[1] is None
    assert blend.summary_rows()[1].samples == 0 and blend.summary_rows()[1].epochs == 0
    assert set(blend.dataset_index.tolist()) == {0, 2}


def test_errors(tmp_path, three):
    with pytest.raises(ValueError, match=r"^got 2 weights for 3 datasets; each dataset needs exactly one weight$"):
        BlendedDataset(three, [1.0, 2.0], 10, 8)
    with pytest.raises(ValueError, match=r"^a blend needs at least one dataset$"):
        BlendedDataset([], [], 10, 8)
    with pytest.raises(ValueError, match=r"^weights must be positive, got 0.0 at position 1$"):
        BlendedDataset(three, [1.0, 0.0, 1.0], 10, 8)
    empty = write_dataset(tmp_path / "empty", 0, 0)
    with pytest.raises(ValueError, match=rf"^dataset {tmp_path / 'empty'} has no documents$"):
        BlendedDataset(three + [empty], [1.0] * 4, 10, 8)
    tiny = write_dataset(tmp_path / "tiny", 1, 0, max_len=5)
    with pytest.raises(ValueError, match=rf"^dataset {tmp_path / 'tiny'} has \d tokens in its documents, fewer "
                                         r"than the seq_length \+ 1 = 9 that one sample needs$"):
        BlendedDataset([three[0], tiny], [1.0, 1e-9], 10, 8)  # checked even where never picked
    with pytest.raises(ValueError, match=r"^num_samples must be >= 1, got 0$"):
        BlendedDataset(three, [1.0] * 3, 0, 8)
    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):  # not numpy's bare "expected non-negative integer"
        BlendedDataset(three, [1.0] * 3, 10, 8, seed=-1)


def test_blend_cache_hit(tmp_path, three, monkeypatch):
    first = BlendedDataset(three, [1.0, 2.0, 3.0], 60, 8, cache_dir=tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("blending indices rebuilt despite a valid cache")

    monkeypatch.setattr(blended_dataset, "build_blending_indices", fail)
    again = BlendedDataset(three, [1.0, 2.0, 3.0], 60, 8, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.dataset_index, again.dataset_index)
    for i in range(60):
        np.testing.assert_array_equal(first[i], again[i])
    with pytest.raises(AssertionError, match="rebuilt despite"):  # other weights: a miss
        BlendedDataset(three, [1.0, 2.0, 4.0], 60, 8, cache_dir=tmp_path / "cache")


def test_cli_blend_prints_weights_and_shares(tmp_path, three, capsys):
    a, b, c = (str(d.prefix) for d in three)
    argv = ["blend", "--data-path", "2", a, "4", b, "1", c, "--seq-length", "16", "--num-samples", "70",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["dataset", "weight", "realized", "samples", "epochs"]
    blend = BlendedDataset(three, [2, 4, 1], 70, 16)
    for line, row in zip(lines[1:4], blend.summary_rows()):
        assert line.split() == [row.name, f"{row.weight:.4%}", f"{row.share:.4%}", str(row.samples),
                                str(row.epochs)]
    assert lines[4].startswith("70 samples of 17 tokens from 3 dataset(s), indices built in ")
    assert list((tmp_path / "cache").glob("blend-*.json"))
    assert main(["blend", "--data-path", a, "--seq-length", "16", "--num-samples", "5"]) == 0
    assert "100.0000%" in capsys.readouterr().out


def test_cli_blend_reports_bad_input(tmp_path, three, capsys):
    a = str(three[0].prefix)
    assert main(["blend", "--data-path", "2", a, "3", "--seq-length", "8", "--num-samples", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"megamath blend: error: --data-path takes WEIGHT PREFIX pairs (or one PREFIX alone), got 3 items: 2 {a} 3")
    missing = str(tmp_path / "nope")
    assert main(["blend", "--data-path", "1", missing, "--seq-length", "8", "--num-samples", "5"]) == 2
    assert capsys.readouterr().err.strip() == f"megamath blend: error: indexed dataset file not found: {missing}.idx"


def test_cli_blend_with_split_blends_only_the_train_parts(three, capsys):
    a, b, c = (str(d.prefix) for d in three)
    argv = ["blend", "--data-path", "2", a, "4", b, "1", c, "--seq-length", "4", "--num-samples", "1000",
            "--split", "8,2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["--split 8,2: documents cut in order into train, validation and test parts",
                         f"  {a}: 30 documents: train 24, valid 6 (reported as a)",
                         f"  {b}: 12 documents: train 10, valid 2 (reported as b)",  # 9.6 rounds to 10
                         f"  {c}: 50 documents: train 40, valid 10 (reported as c)"]
    documents = [np.arange(24), np.arange(10), np.arange(40)]
    blend = BlendedDataset(three, [2, 4, 1], 1000, 4, documents=documents)
    for line, row in zip(lines[5:8], blend.summary_rows()):
        assert line.split()[-1] == str(row.epochs)  # the train parts' epochs, not the whole datasets'
    assert [row.epochs for row in blend.summary_rows()] != [row.epochs for row in
                                                             BlendedDataset(three, [2, 4, 1], 1000, 4).summary_rows()]
    assert main(argv[:-1] + ["2,8,x"]) == 2
    assert capsys.readouterr().err.strip() == ("megamath blend: error: --split '2,8,x': 'x' is not a number; "
                                               "expected shares such as '969,30,1'")
