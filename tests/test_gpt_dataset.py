"""GPTDataset samples against a naive concatenate-then-slice reference, its errors, and the index cache."""
from __future__ import annotations

import errno
import json
import logging
import os

import numpy as np
import pytest

from megamath.data import index_cache, sample_index
from megamath.data.gpt_dataset import INDEX_NAMES, GPTDataset
from megamath.data.index_cache import IndexCache
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter


def write_dataset(prefix, documents, dtype=np.uint16) -> IndexedDataset:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
    return IndexedDataset(prefix)


def random_documents(rng, n, max_len=30, min_len=1):
    return [rng.integers(0, 60000, int(rng.integers(min_len, max_len + 1))) for _ in range(n)]


def naive_samples(documents, doc_idx, seq_length, count):
    """Sample j = tokens [j*L, j*L + L] of the documents concatenated in doc_idx order."""
    stream = np.concatenate([np.asarray(documents[d], dtype=np.int64) for d in doc_idx])
    return [stream[j * seq_length:j * seq_length + seq_length + 1] for j in range(count)]


@pytest.mark.parametrize("n_docs, max_len, min_len, seq_length, num_samples, subset", [
    (20, 30, 1, 8, 10, False),      # one epoch
    (7, 12, 1, 16, 40, False),      # several epochs, documents shorter than a sample
    (15, 5, 0, 3, 30, False),       # zero- and one-token documents
    (12, 25, 1, 1, 50, False),      # seq_length 1: two-token samples
    (30, 20, 1, 10, 25, True),      # a subset of the sequences as documents
])
def test_samples_equal_naive_reference(tmp_path, n_docs, max_len, min_len, seq_length, num_samples, subset):
    rng = np.random.default_rng(n_docs * 100 + seq_length)
    docs = random_documents(rng, n_docs, max_len, min_len)
    dataset = write_dataset(tmp_path / "data", docs)
    documents = np.sort(rng.choice(n_docs, n_docs // 2, replace=False)) if subset else np.arange(n_docs)
    gpt = GPTDataset(dataset, num_samples, seq_length, seed=5, documents=documents if subset else None)
    assert len(gpt) == num_samples
    # doc_idx is the seeded per-epoch permutation of the documents
    rng_ref = np.random.RandomState(5)
    expected_doc_idx = np.concatenate([rng_ref.permutation(documents) for _ in range(gpt.num_epochs)])
    np.testing.assert_array_equal(gpt.doc_idx, expected_doc_idx)
    reference = naive_samples(docs, gpt.doc_idx, seq_length, len(gpt.shuffle_idx))
    for i in range(num_samples):
        sample = gpt[i]
        assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
        np.testing.assert_array_equal(sample, reference[gpt.shuffle_idx[i]])
    np.testing.assert_array_equal(gpt[-1], gpt[num_samples - 1])


def test_consecutive_samples_share_one_token(tmp_path):
    docs = random_documents(np.random.default_rng(0), 10)
    gpt = GPTDataset(write_dataset(tmp_path / "d", docs), 12, 6, seed=1)
    by_position = {int(j): gpt[i] for i, j in enumerate(gpt.shuffle_idx[:len(gpt)])}
    for j in sorted(by_position):
        if j + 1 in by_position:
            assert by_position[j][-1] == by_position[j + 1][0]


def test_multi_epoch_reads_full_epochs_first(tmp_path):
    docs = random_documents(np.random.default_rng(1), 6, max_len=10)
    dataset = write_dataset(tmp_path / "d", docs)
    tokens = int(dataset.sizes.sum())
    gpt = GPTDataset(dataset, 3 * tokens // 4, 4, seed=2)  # 3 epochs, the last partial
    assert gpt.num_epochs == 3
    first = sample_index.samples_in(2 * tokens, 4)
    assert set(gpt.shuffle_idx[:first].tolist()) == set(range(first))


def test_index_out_of_range(tmp_path):
    gpt = GPTDataset(write_dataset(tmp_path / "d", [np.arange(40)]), 3, 8)
    for i in (3, -4):
        with pytest.raises(IndexError, match=rf"^sample {i} out of range for .*d with 3 samples$"):
            gpt[i]


def test_errors_name_the_dataset(tmp_path):
    empty = write_dataset(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=rf"^dataset {tmp_path / 'empty'} has no documents$"):
        GPTDataset(empty, 1, 4)
    small = write_dataset(tmp_path / "small", [np.arange(3), np.arange(1)])
    with pytest.raises(ValueError, match=rf"^dataset {tmp_path / 'small'} has 4 tokens in its documents, fewer "
                                         r"than the seq_length \+ 1 = 5 that one sample needs$"):
        GPTDataset(small, 1, 4)
    with pytest.raises(ValueError, match=rf"^documents for {tmp_path / 'small'} must lie in \[0, 2\), got \[0, 2\]$"):
        GPTDataset(small, 1, 2, documents=np.array([0, 2]))
    with pytest.raises(ValueError, match=r"^num_samples must be >= 1, got 0$"):
        GPTDataset(small, 0, 2)
    with pytest.raises(ValueError, match=r"^seq_length must be >= 1, got 0$"):
        GPTDataset(small, 1, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_float_dataset_is_refused_not_truncated_to_token_ids(tmp_path, dtype):
    """A float indexed dataset (codes 6, 7) is valid MMIDIDX, but its samples were cast to int64: 2.7 -> 2."""
    floats = write_dataset(tmp_path / "f", [np.array([1.5, 2.7, 3.9, 4.2, 5.5, 6.6, 7.1, 8.8, 9.9], dtype)], dtype)
    with pytest.raises(ValueError, match=rf"^dataset {tmp_path / 'f'} stores {np.dtype(dtype)} values, not token "
                                         r"ids: GPT samples need an integer dataset \(uint16 or int32, as preprocess"):
        GPTDataset(floats, 2, 4)
    assert len(GPTDataset(write_dataset(tmp_path / "i", [np.arange(9)], np.int64), 2, 4)) == 2  # any integer type


# --- the index cache ----------------------------------------------------------------------------------

@pytest.fixture
def counted_builds(monkeypatch):
    """Counts calls of the index builder, which GPTDataset reaches through the sample_index module."""
    calls = []
    real = sample_index.build_gpt_indices

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_index, "build_gpt_indices", counting)
    return calls


def small_dataset(tmp_path, seed=0):
    return write_dataset(tmp_path / "data", random_documents(np.random.default_rng(seed), 25))


def assert_same_indices(a: GPTDataset, b: GPTDataset):
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    dataset = small_dataset(tmp_path)
    built = GPTDataset(dataset, 20, 8, seed=3, cache_dir=tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("index rebuilt despite a valid cache")

    monkeypatch.setattr(sample_index, "build_gpt_indices", fail)
    loaded = GPTDataset(dataset, 20, 8, seed=3, cache_dir=tmp_path / "cache")
    assert isinstance(loaded.sample_idx, np.memmap)
    assert_same_indices(built, loaded)
    for i in range(len(loaded)):
        np.testing.assert_array_equal(built[i], loaded[i])
    monkeypatch.undo()
    in_memory = GPTDataset(dataset, 20, 8, seed=3)  # no cache_dir: built afresh, same indices
    assert_same_indices(built, in_memory)


def test_no_cache_dir_writes_nothing(tmp_path, counted_builds):
    dataset = small_dataset(tmp_path)
    before = sorted(tmp_path.iterdir())
    GPTDataset(dataset, 20, 8)
    GPTDataset(dataset, 20, 8)
    assert len(counted_builds) == 2
    assert sorted(tmp_path.iterdir()) == before


def test_cache_miss_when_any_key_parameter_changes(tmp_path, counted_builds):
    dataset = small_dataset(tmp_path)
    cache = tmp_path / "cache"
    base = dict(num_samples=20, seq_length=8, seed=3, documents=None)
    variants = [dict(), dict(num_samples=21), dict(seq_length=7), dict(seed=4), dict(documents=np.arange(24)),
                dict(documents=np.arange(1, 25))]
    for variant in variants:
        GPTDataset(dataset, cache_dir=cache, **{**base, **variant})
    assert len(counted_builds) == len(variants)
    for variant in variants:  # all of them are now cached
        GPTDataset(dataset, cache_dir=cache, **{**base, **variant})
    assert len(counted_builds) == len(variants)
    # new content under the same prefix changes the fingerprint
    changed = small_dataset(tmp_path, seed=1)
    GPTDataset(changed, cache_dir=cache, **base)
    assert len(counted_builds) == len(variants) + 1


def _corrupt_array(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_array(path):
    path.write_bytes(path.read_bytes()[:-16])


def _remove_array(path):
    path.unlink()


def _tamper_checksum(meta_path):
    meta = json.loads(meta_path.read_text())
    meta["arrays"]["shuffle_idx"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))


def _tamper_description(meta_path):
    meta = json.loads(meta_path.read_text())
    meta["description"]["seed"] = 99
    meta_path.write_text(json.dumps(meta))


def _garble_metadata(meta_path):
    meta_path.write_text('{"format": 1, "descr')


def _wrong_format(meta_path):
    meta = json.loads(meta_path.read_text())
    meta["format"] = 0
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, target, reason", [
    (_corrupt_array, "sample_idx", "fails its sha256 check"),
    (_truncate_array, "doc_idx", "bytes, metadata says"),
    (_remove_array, "shuffle_idx", "is missing"),
    (_tamper_checksum, "metadata", "fails its sha256 check"),
    (_tamper_description, "metadata", "its description differs from the requested one"),
    (_garble_metadata, "metadata", "unreadable metadata"),
    (_wrong_format, "metadata", "metadata format is not 1"),
])
def test_damaged_cache_is_rebuilt(tmp_path, counted_builds, caplog, damage, target, reason):
    dataset = small_dataset(tmp_path)
    cache_dir = tmp_path / "cache"
    built = GPTDataset(dataset, 20, 8, seed=3, cache_dir=cache_dir)
    cache = IndexCache(cache_dir)
    damage(cache.metadata_path(built.description) if target == "metadata"
           else cache.array_path(built.description, target))
    with caplog.at_level(logging.WARNING, logger="megamath.data.index_cache"):
        rebuilt = GPTDataset(dataset, 20, 8, seed=3, cache_dir=cache_dir)
    assert len(counted_builds) == 2
    assert any(reason in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records), caplog.text
    assert_same_indices(built, rebuilt)
    GPTDataset(dataset, 20, 8, seed=3, cache_dir=cache_dir)  # repaired: a hit again
    assert len(counted_builds) == 2


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC], ids=errno.errorcode.get)
def test_a_cache_that_cannot_be_written_leaves_the_indices_in_memory(tmp_path, monkeypatch, caplog, code):
    """A shared or read-only cache folder is not the run's failure (the real refusal: test_unprivileged.py);
    a full disk still is."""
    dataset = small_dataset(tmp_path)

    def refused(path, write):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(index_cache, "replace_atomically", refused)
    if code == errno.ENOSPC:
        with pytest.raises(OSError, match="No space left"):
            GPTDataset(dataset, 20, 8, seed=3, cache_dir=tmp_path / "cache")
        return
    with caplog.at_level(logging.WARNING, logger="megamath.data.index_cache"):
        built = GPTDataset(dataset, 20, 8, seed=3, cache_dir=tmp_path / "cache")
    assert f"index cache {tmp_path / 'cache'} cannot be written ({os.strerror(code)})" in caplog.text
    assert_same_indices(built, GPTDataset(dataset, 20, 8, seed=3))


def test_cache_load_and_save_are_separate(tmp_path):
    dataset = small_dataset(tmp_path)
    gpt = GPTDataset(dataset, 20, 8, seed=3)
    cache = IndexCache(tmp_path / "cache")
    assert cache.load(gpt.description, INDEX_NAMES) is None  # nothing there yet: a miss, no error
    cache.save(gpt.description, gpt.build_indices())
    loaded = cache.load(gpt.description, INDEX_NAMES)
    for name in INDEX_NAMES:
        np.testing.assert_array_equal(loaded[name], getattr(gpt, name))
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
