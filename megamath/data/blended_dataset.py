"""A weighted mixture of GPT datasets, Megatron-LM's BlendedDataset without its sample-count guessing.

The blending indices decide, for each of num_samples samples, its dataset and its rank within that
dataset. Their counts are exactly what each dataset must supply, so each GPTDataset is built for
that count (Megatron-LM asks each for weight * num_samples * 1.005 and hopes). A dataset the blend
never picks (a tiny weight, few samples) gets no GPTDataset at all. With sample_order `megatron` or `neox`
the blend and each dataset are built as that trainer builds them (megatron_order.py), sample for sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from megamath.data import megatron_order
from megamath.data.blending import build_blending_indices, normalize_weights
from megamath.data.gpt_dataset import GPTDataset, TokenSource, check_documents, dataset_name
from megamath.data.index_cache import INDEX_FORMAT_VERSION, IndexCache, load_or_build

BLEND_NAMES = ("dataset_index", "dataset_sample_index")


class BlendRow(NamedTuple):
    """One dataset's line of the blend summary."""

    name: str
    weight: float  # normalized target share
    share: float  # realized share of samples (= of tokens: all samples have seq_length + 1 tokens)
    samples: int
    epochs: int  # epochs of its documents that its samples span (0 when it supplies none)


def dataset_seed(seed: int, position: int) -> int:
    """Seed of the position-th dataset's GPTDataset: distinct per position, stable per (seed, position)."""
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0])


class BlendedDataset:
    """num_samples samples of seq_length + 1 int64 tokens, drawn from `datasets` in proportion to `weights`."""

    def __init__(self, datasets: Sequence[TokenSource], weights: Sequence[float], num_samples: int,
                 seq_length: int, seed: int = 1234, cache_dir: str | Path | None = None,
                 documents: Sequence[np.ndarray | None] | None = None, sample_order: str = "megamath",
                 surplus: float = megatron_order.BLEND_SURPLUS) -> None:
        """documents: per dataset, the sequence ids it may supply (None: all), e.g. its part of a split.
        sample_order: `megamath`, or `megatron` / `neox` for that trainer's blend and GPT orders.
        surplus: with those, the extra share of samples each dataset is built for (Megatron-LM's
        --mid-level-dataset-surplus; 0 for a lone prefix given without a weight, which both read unblended)."""
        datasets = list(datasets)
        documents = [None] * len(datasets) if documents is None else list(documents)
        if len(documents) != len(datasets):
            raise ValueError(f"got {len(documents)} document lists for {len(datasets)} datasets")
        if len(datasets) == 0:
            raise ValueError("a blend needs at least one dataset")
        if len(weights) != len(datasets):
            raise ValueError(f"got {len(weights)} weights for {len(datasets)} datasets; "
                             "each dataset needs exactly one weight")
        if int(seq_length) < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if int(seed) < 0:  # else numpy's SeedSequence says only "expected non-negative integer"
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.sample_order = megatron_order.check_sample_order(sample_order)
        peer = self.sample_order != "megamath"  # a trainer's order: megatron_order.py
        self.names = [dataset_name(d) for d in datasets]
        for dataset, docs in zip(datasets, documents):  # every dataset must be usable, picked or not
            check_documents(dataset, docs, self.seq_length)
        self.weights = normalize_weights(weights)  # (D,)
        description = {"kind": "blend", "version": INDEX_FORMAT_VERSION, "weights": self.weights.tolist(),
                       "num_samples": self.num_samples, "sample_order": self.sample_order}
        cache = IndexCache(cache_dir) if cache_dir is not None else None
        arrays = load_or_build(cache, description, BLEND_NAMES, lambda: dict(zip(BLEND_NAMES, (
            megatron_order.build_blending_indices(weights, self.num_samples, self.sample_order) if peer
            else build_blending_indices(weights, self.num_samples)))))
        self.dataset_index = arrays["dataset_index"]  # (num_samples,) int16
        self.dataset_sample_index = arrays["dataset_sample_index"]  # (num_samples,) int64
        self.counts = np.bincount(self.dataset_index, minlength=len(datasets)).astype(np.int64)  # (D,)
        # what each dataset is built for: exactly its count here; the trainer's count with its surplus there
        built = (megatron_order.requested_samples(weights, self.num_samples, self.sample_order, surplus) if peer
                 else self.counts)
        self.datasets: list[GPTDataset | None] = [
            GPTDataset(dataset, int(size), self.seq_length, seed=self.seed if peer else dataset_seed(self.seed, k),
                       documents=docs, cache_dir=cache_dir, sample_order=self.sample_order)
            if count > 0 else None
            for k, (dataset, count, size, docs) in enumerate(zip(datasets, self.counts, built, documents))
        ]

    def __len__(self) -> int:
        return self.num_samples

    def dataset_of(self, i: int) -> int:
        """Position (in `datasets`) of the dataset sample i comes from."""
        return int(self.dataset_index[i])

    def __getitem__(self, i: int) -> np.ndarray:
        """(seq_length + 1,) int64 tokens of sample i."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a blend of {self.num_samples} samples")
        d = int(self.dataset_index[i])
        return self.datasets[d][int(self.dataset_sample_index[i])]

    def realized_shares(self) -> np.ndarray:
        """(D,) float64 fraction of samples (and so of tokens) each dataset supplies."""
        return self.counts / self.num_samples

    def summary_rows(self) -> list[BlendRow]:
        shares = self.realized_shares()
        return [BlendRow(name, float(w), float(s), int(c), gpt.num_epochs if gpt is not None else 0)
                for name, w, s, c, gpt in zip(self.names, self.weights, shares, self.counts, self.datasets)]
