"""The three index arrays behind a GPT dataset, as Megatron-LM defines them: doc_idx, sample_idx, shuffle_idx.

Why a separate file: this is pure arithmetic on sizes and seeds (no files, no caching), so it can be
tested exhaustively against its references and reused by whoever builds indices (one rank, a CLI).

    doc_idx      (E * D,) int64      the documents in reading order: one permutation of `documents` per
                                     epoch, epochs concatenated
    sample_idx   (S + 1, 2) int64    row k = (position in doc_idx, offset in that document) of global
                                     token k * seq_length; sample k is tokens [k*L, (k+1)*L] inclusive,
                                     rows k and k + 1, so consecutive samples share one boundary token
    shuffle_idx  (S,) int64          a permutation of the S samples; with several epochs the last
                                     (partial) epoch's samples are shuffled apart and placed last

All three come from one `np.random.RandomState(seed)` in that order (doc_idx, then shuffle_idx), so the
same inputs give the same indices on every rank and every run.

Unlike Megatron-LM, which shuffles the concatenation of all epochs' documents at once, each epoch
here is its own permutation, so every epoch reads every document exactly once.
"""
from __future__ import annotations

import numpy as np

from megamath import _helpers


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest e >= 1 with (e * tokens_per_epoch - 1) // seq_length >= num_samples.

    A sample needs seq_length + 1 tokens but shares one with the next, so e epochs give
    (e * T - 1) // L full samples.
    """
    if tokens_per_epoch <= 0:
        raise ValueError(f"tokens_per_epoch must be positive, got {tokens_per_epoch}")
    needed = num_samples * seq_length + 1  # tokens that num_samples samples span
    return max(1, -(-needed // tokens_per_epoch))


def samples_in(num_tokens: int, seq_length: int) -> int:
    """Full samples of seq_length + 1 tokens (sharing boundary tokens) that num_tokens tokens give."""
    return max(0, (num_tokens - 1) // seq_length)


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """(num_epochs * len(documents),) int64: one fresh permutation of `documents` per epoch."""
    documents = np.asarray(documents, dtype=np.int64)
    doc_idx = np.empty(num_epochs * len(documents), dtype=np.int64)  # (E * D,)
    for epoch in range(num_epochs):
        doc_idx[epoch * len(documents):(epoch + 1) * len(documents)] = rng.permutation(documents)
    return doc_idx


def build_shuffle_idx(num_samples: int, num_samples_first: int, rng: np.random.RandomState) -> np.ndarray:
    """(num_samples,) int64: samples [0, first) shuffled, then samples [first, num_samples) shuffled apart.

    `num_samples_first` is the sample count of all epochs but the last; with one epoch pass
    num_samples, and the whole range is one shuffle.
    """
    first = np.arange(num_samples_first, dtype=np.int64)
    rng.shuffle(first)
    if num_samples_first == num_samples:
        return first
    last = np.arange(num_samples_first, num_samples, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate([first, last])


def _aligned_sizes(sizes: np.ndarray) -> np.ndarray:
    # An IndexedDataset's sizes view sits at byte 34 of the .idx memmap (unaligned for int32);
    # C++ must not read it through an int32 pointer, so copy in that case (4 bytes per sequence).
    return np.require(sizes, dtype=np.int32, requirements=["C", "A"])


def build_sample_index(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) int64 sample index, one C++ pass with the GIL released.

    sizes: (N,) tokens per sequence; doc_idx: (E * D,) sequence ids in reading order.
    Zero-length documents are allowed (no row ever points into one); negative sizes, ids outside
    sizes and a doc_idx too short for num_samples raise ValueError.
    """
    return _helpers.build_sample_index(_aligned_sizes(sizes), np.ascontiguousarray(doc_idx, dtype=np.int64),
                                       int(seq_length), int(num_samples))


def build_sample_index_ref(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Numpy reference of `build_sample_index` by a different route: a binary search of every row's
    global position in the cumulative document lengths."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    doc_sizes = np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx, dtype=np.int64)]  # (E * D,)
    if len(doc_sizes) and doc_sizes.min() < 0:
        raise ValueError("sizes must not be negative")
    starts = np.concatenate([[0], np.cumsum(doc_sizes)])  # (E * D + 1,) global position of each document
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # (S + 1,)
    if num_samples * seq_length + 1 > starts[-1]:
        raise ValueError(f"doc_idx holds {starts[-1]} tokens, {num_samples} samples of seq_length "
                         f"{seq_length} need {num_samples * seq_length + 1}")
    # the last document starting at or before each position; side="right" steps over empty documents
    j = np.searchsorted(starts, positions, side="right") - 1  # (S + 1,)
    return np.stack([j, positions - starts[j]], axis=1).astype(np.int64)


def plan_epochs(sizes: np.ndarray, documents: np.ndarray, num_samples: int,
                seq_length: int) -> tuple[np.ndarray, int, int]:
    """(documents as int64, tokens per epoch, epochs needed for num_samples), after checking the counts."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    return documents, tokens_per_epoch, num_epochs_needed(tokens_per_epoch, seq_length, num_samples)


def index_epochs(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, tokens_per_epoch: int, num_epochs: int,
                 final_epoch_apart: bool, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """doc_idx with the sample_idx of every full sample its epochs give, and their shuffle_idx (the final epoch's
    samples shuffled apart when `final_epoch_apart`), drawn from `rng` after doc_idx was."""
    total = samples_in(num_epochs * tokens_per_epoch, seq_length)  # S
    sample_idx = build_sample_index(sizes, doc_idx, seq_length, total)
    apart = final_epoch_apart and num_epochs > 1
    first = samples_in((num_epochs - 1) * tokens_per_epoch, seq_length) if apart else total
    shuffle_idx = build_shuffle_idx(total, first, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def build_gpt_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int,
                      seed: int) -> dict[str, np.ndarray]:
    """doc_idx, sample_idx and shuffle_idx for `num_samples` samples of seq_length + 1 tokens.

    sizes: (N,) tokens per sequence; documents: (D,) the sequence ids to read (each a document).
    Epochs are added until num_samples fit; sample_idx holds every full sample those epochs give
    (at least num_samples), and the dataset reads the first num_samples of shuffle_idx.
    """
    documents, tokens_per_epoch, num_epochs = plan_epochs(sizes, documents, num_samples, seq_length)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng)
    return index_epochs(sizes, doc_idx, seq_length, tokens_per_epoch, num_epochs, True, rng)
