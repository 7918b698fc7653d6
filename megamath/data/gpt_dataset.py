"""GPT training samples over one indexed dataset, with Megatron-LM's GPTDataset semantics.

A sample is seq_length + 1 tokens packed across document boundaries; sample i's last token is sample
i+1's first, so the model reads tokens[:-1] and predicts tokens[1:]. Documents are shuffled per
epoch, samples are shuffled (the partial last epoch apart, after the full ones), and len(dataset) is
exactly num_samples. The index arithmetic lives in `sample_index.py` (Megatron-LM's and GPT-NeoX's
orders, where they differ, in `megatron_order.py`), caching in `index_cache.py`; this file joins them to a
dataset and reads samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from megamath.data import megatron_order, sample_index
from megamath.data.index_cache import INDEX_FORMAT_VERSION, IndexCache, array_digest, load_or_build

INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


class TokenSource(Protocol):
    """What GPTDataset needs of an `IndexedDataset`."""

    prefix: Path
    sizes: np.ndarray  # (N,) int32 tokens per sequence

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


def dataset_name(dataset: TokenSource) -> str:
    return str(getattr(dataset, "prefix", dataset))


def gpt_index_description(dataset: TokenSource, documents: np.ndarray, num_samples: int, seq_length: int,
                          seed: int, sample_order: str = "megamath") -> dict:
    """Everything that changes doc_idx / sample_idx / shuffle_idx, as the cache key's description."""
    return {
        "kind": "gpt",
        "version": INDEX_FORMAT_VERSION,
        "fingerprint": dataset.fingerprint(),
        "documents": {"count": int(len(documents)), "sha256": array_digest(documents)},
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
        "sample_order": sample_order,
    }


def check_documents(dataset: TokenSource, documents: np.ndarray | None, seq_length: int) -> tuple[np.ndarray, int]:
    """(`documents` as an int64 array (all sequences by default), their token count), rejecting ids out
    of range, datasets too small for one sample and datasets of non-integer values, with messages that name
    the dataset. A float dataset is a valid MMIDIDX file, but its values cast to int64 token ids silently
    truncated (2.7 -> 2): training on it would learn from ids nobody wrote."""
    name, n = dataset_name(dataset), len(dataset.sizes)
    dtype = getattr(dataset, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "iu":
        raise ValueError(f"dataset {name} stores {np.dtype(dtype)} values, not token ids: GPT samples need an "
                         "integer dataset (uint16 or int32, as preprocess writes)")
    all_sequences = documents is None
    if all_sequences:
        documents = np.arange(n, dtype=np.int64)
    documents = np.asarray(documents)
    if documents.ndim != 1 or (documents.size and documents.dtype.kind not in "iu"):
        raise ValueError(f"documents for {name} must be a 1-D integer array, got {documents.dtype} "
                         f"of shape {documents.shape}")
    documents = documents.astype(np.int64, copy=False)
    if len(documents) == 0:
        raise ValueError(f"dataset {name} has no documents")
    if documents.min() < 0 or documents.max() >= n:
        raise ValueError(f"documents for {name} must lie in [0, {n}), got [{documents.min()}, {documents.max()}]")
    sizes = np.asarray(dataset.sizes)
    tokens = int((sizes if all_sequences else sizes[documents]).sum(dtype=np.int64))
    if tokens < seq_length + 1:
        raise ValueError(f"dataset {name} has {tokens} tokens in its documents, fewer than the "
                         f"seq_length + 1 = {seq_length + 1} that one sample needs")
    return documents, tokens


class GPTDataset:
    """`num_samples` samples of `seq_length + 1` int64 tokens from `dataset`.

    dataset:    an IndexedDataset (or anything with prefix, sizes, get, fingerprint)
    documents:  sequence ids to read, each a document (default: all); e.g. one split
    cache_dir:  where indices are cached (None: built in memory every time)
    sample_order: `megamath`, or `megatron` / `neox` for that trainer's order (megatron_order.py)
    """

    def __init__(self, dataset: TokenSource, num_samples: int, seq_length: int, seed: int = 1234,
                 documents: np.ndarray | None = None, cache_dir: str | Path | None = None,
                 sample_order: str = "megamath") -> None:
        if int(seq_length) < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.dataset = dataset
        self.name = dataset_name(dataset)
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.sample_order = megatron_order.check_sample_order(sample_order)
        self.documents, self.tokens_per_epoch = check_documents(dataset, documents, self.seq_length)
        self.description = gpt_index_description(dataset, self.documents, self.num_samples,
                                                 self.seq_length, self.seed, self.sample_order)
        cache = IndexCache(cache_dir) if cache_dir is not None else None
        arrays = load_or_build(cache, self.description, INDEX_NAMES, self.build_indices)
        self.doc_idx = arrays["doc_idx"]  # (E * D,)
        self.sample_idx = arrays["sample_idx"]  # (S + 1, 2)
        self.shuffle_idx = arrays["shuffle_idx"]  # (S,)
        self.num_epochs = sample_index.num_epochs_needed(self.tokens_per_epoch, self.seq_length, self.num_samples)

    def build_indices(self) -> dict[str, np.ndarray]:
        """doc_idx, sample_idx, shuffle_idx built from scratch (what a cache miss runs)."""
        arguments = (self.dataset.sizes, self.documents, self.num_samples, self.seq_length, self.seed)
        if self.sample_order == "megamath":
            return sample_index.build_gpt_indices(*arguments)
        return megatron_order.build_gpt_indices(*arguments, order=self.sample_order)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """(seq_length + 1,) int64 tokens of sample i (after shuffling)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} with {self.num_samples} samples")
        j = int(self.shuffle_idx[int(i) % self.num_samples])
        (first, offset), (last, end) = self.sample_idx[j], self.sample_idx[j + 1]  # end is inclusive
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        if first == last:
            tokens[:] = self.dataset.get(int(self.doc_idx[first]), int(offset), int(end - offset + 1))
            return tokens
        # spans are zero-copy views; the only copy is into `tokens` (with the cast to int64)
        pos = 0
        for k in range(first, last + 1):
            if k == first:
                span = self.dataset.get(int(self.doc_idx[k]), int(offset))
            elif k == last:
                span = self.dataset.get(int(self.doc_idx[k]), 0, int(end + 1))
            else:
                span = self.dataset.get(int(self.doc_idx[k]))
            tokens[pos:pos + len(span)] = span
            pos += len(span)
        assert pos == len(tokens), f"sample {i} of {self.name} read {pos} tokens, expected {len(tokens)}"
        return tokens
