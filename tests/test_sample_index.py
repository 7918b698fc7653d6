"""The sample index: C++ against its numpy reference and against token-by-token positions; epochs; shuffles."""
from __future__ import annotations

import numpy as np
import pytest

from megamath import _helpers
from megamath.data import sample_index as si


def token_positions(sizes, doc_idx):
    """(T, 2) (position in doc_idx, offset) of every token of the concatenation: the definition, spelled out."""
    doc_sizes = np.asarray(sizes, dtype=np.int64)[doc_idx]
    j = np.repeat(np.arange(len(doc_idx)), doc_sizes)
    starts = np.concatenate([[0], np.cumsum(doc_sizes)[:-1]])
    return np.stack([j, np.arange(len(j)) - starts[j]], axis=1)


def random_case(rng):
    n = int(rng.integers(1, 40))
    kind = rng.integers(4)
    if kind == 0:
        sizes = rng.integers(1, 3, n)  # length-1 and length-2 documents
    elif kind == 1:
        sizes = rng.integers(0, 4, n)  # with zero-length documents
    else:
        sizes = rng.integers(1, 60, n)
    sizes = sizes.astype(np.int32)
    if sizes.sum() == 0:
        sizes[0] = 1
    documents = np.arange(n) if rng.integers(2) else np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
    if sizes[documents].sum() == 0:
        sizes[documents[0]] = 3
    seq_length = int(rng.choice([1, 2, 3, int(rng.integers(1, 100))]))
    epochs = int(rng.integers(1, 4))
    doc_idx = si.build_doc_idx(documents, epochs, np.random.RandomState(int(rng.integers(1 << 31))))
    num_samples = si.samples_in(epochs * int(sizes[documents].sum()), seq_length)
    return sizes, doc_idx, seq_length, num_samples


def test_cpp_equals_reference_and_definition_on_random_inputs():
    rng = np.random.default_rng(20240601)
    for _ in range(400):
        sizes, doc_idx, seq_length, num_samples = random_case(rng)
        got = si.build_sample_index(sizes, doc_idx, seq_length, num_samples)
        ref = si.build_sample_index_ref(sizes, doc_idx, seq_length, num_samples)
        assert got.dtype == np.int64 and got.shape == (num_samples + 1, 2)
        np.testing.assert_array_equal(got, ref)
        positions = token_positions(sizes, doc_idx)
        np.testing.assert_array_equal(got, positions[np.arange(num_samples + 1) * seq_length])


def test_small_example_by_hand():
    # documents 3, 0 and 5 tokens long: tokens a0 a1 a2 | | c0 c1 c2 c3 c4; rows at tokens 0, 2, 4, 6
    rows = si.build_sample_index(np.array([3, 0, 5], np.int32), np.array([0, 1, 2]), 2, 3)
    np.testing.assert_array_equal(rows, [[0, 0], [0, 2], [2, 1], [2, 3]])
    # a sample that ends on a document's last token points there, not at the next document
    rows = si.build_sample_index(np.array([3, 4], np.int32), np.array([0, 1]), 2, 2)
    np.testing.assert_array_equal(rows, [[0, 0], [0, 2], [1, 1]])


def test_leading_empty_documents_are_skipped():
    rows = si.build_sample_index(np.array([0, 0, 4], np.int32), np.array([0, 1, 2]), 3, 1)
    np.testing.assert_array_equal(rows, [[2, 0], [2, 3]])


def test_unaligned_sizes_view_is_read_correctly():
    # an IndexedDataset's sizes are an int32 view at byte 34 of the .idx memmap
    raw = np.zeros(2 + 4 * 6, dtype=np.uint8)
    sizes = raw[2:].view(np.int32)
    sizes[:] = [5, 1, 7, 2, 9, 4]
    assert sizes.ctypes.data % 4 == 2  # numpy allocations are at least 16-byte aligned
    doc_idx = np.array([3, 0, 5, 1, 2, 4])
    np.testing.assert_array_equal(si.build_sample_index(sizes, doc_idx, 4, 6),
                                  si.build_sample_index_ref(sizes.copy(), doc_idx, 4, 6))


def test_errors_name_the_fault():
    sizes = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match=r"^doc_idx runs out of tokens: 3 samples of seq_length 3 need 10 tokens, "
                                         r"doc_idx holds 7$"):
        si.build_sample_index(sizes, np.array([0, 1]), 3, 3)
    with pytest.raises(ValueError, match=r"^doc_idx\[1\] = 2 is outside \[0, 2\)$"):
        si.build_sample_index(sizes, np.array([0, 2]), 3, 2)
    with pytest.raises(ValueError, match=r"^sizes\[1\] is negative: -4$"):
        si.build_sample_index(np.array([3, -4], np.int32), np.array([0, 1]), 3, 2)
    with pytest.raises(ValueError, match=r"^seq_length must be >= 1, got 0$"):
        si.build_sample_index(sizes, np.array([0, 1]), 0, 2)
    with pytest.raises(ValueError, match=r"^num_samples must be >= 0, got -1$"):
        _helpers.build_sample_index(sizes, np.array([0, 1]), 3, -1)
    with pytest.raises(ValueError, match=r"^doc_idx holds 7 tokens, 3 samples of seq_length 3 need 10$"):
        si.build_sample_index_ref(sizes, np.array([0, 1]), 3, 3)


def test_num_epochs_is_the_smallest_that_fits():
    for tokens in range(1, 30):
        for seq_length in range(1, 12):
            for num_samples in range(1, 20):
                e = si.num_epochs_needed(tokens, seq_length, num_samples)
                assert (e * tokens - 1) // seq_length >= num_samples
                assert e == 1 or ((e - 1) * tokens - 1) // seq_length < num_samples
    with pytest.raises(ValueError, match="^tokens_per_epoch must be positive, got 0$"):
        si.num_epochs_needed(0, 4, 1)


def test_doc_idx_is_one_permutation_per_epoch():
    documents = np.array([2, 5, 7, 11, 13])
    doc_idx = si.build_doc_idx(documents, 3, np.random.RandomState(7))
    assert doc_idx.dtype == np.int64 and len(doc_idx) == 15
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(doc_idx[epoch * 5:(epoch + 1) * 5]), documents)
    rng = np.random.RandomState(7)
    expected = np.concatenate([rng.permutation(documents) for _ in range(3)])
    np.testing.assert_array_equal(doc_idx, expected)


def test_shuffle_idx_keeps_the_last_epoch_apart():
    shuffle = si.build_shuffle_idx(50, 30, np.random.RandomState(3))
    np.testing.assert_array_equal(np.sort(shuffle[:30]), np.arange(30))
    np.testing.assert_array_equal(np.sort(shuffle[30:]), np.arange(30, 50))
    assert not np.array_equal(shuffle[:30], np.arange(30))
    one = si.build_shuffle_idx(40, 40, np.random.RandomState(3))
    np.testing.assert_array_equal(np.sort(one), np.arange(40))


def test_gpt_indices_cover_num_samples_and_are_seeded():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 30, 25).astype(np.int32)
    documents = np.arange(3, 25)
    tokens = int(sizes[documents].sum())
    num_samples = 3 * tokens // 8  # needs 3 or 4 epochs of seq_length 8: the last one partial
    out = si.build_gpt_indices(sizes, documents, num_samples, 8, seed=11)
    epochs = si.num_epochs_needed(tokens, 8, num_samples)
    assert epochs > 1
    total = si.samples_in(epochs * tokens, 8)
    first = si.samples_in((epochs - 1) * tokens, 8)
    assert out["sample_idx"].shape == (total + 1, 2) and total >= num_samples
    np.testing.assert_array_equal(np.sort(out["shuffle_idx"][:first]), np.arange(first))
    np.testing.assert_array_equal(np.sort(out["shuffle_idx"][first:]), np.arange(first, total))
    assert len(out["doc_idx"]) == epochs * len(documents)
    again = si.build_gpt_indices(sizes, documents, num_samples, 8, seed=11)
    other = si.build_gpt_indices(sizes, documents, num_samples, 8, seed=12)
    for name in out:
        np.testing.assert_array_equal(out[name], again[name])
    assert not np.array_equal(out["shuffle_idx"], other["shuffle_idx"])

