"""The cases of tests/test_megatron_order.py, and what Megatron-LM's own datasets gave for them.

Each case is a Megatron-LM data setup (--data-path, --split, --seed, --seq-length, and train-iters ×
global-batch = num_samples) over small datasets whose documents come from `documents`. MEGATRON holds
SHA-256 digests of the arrays and samples that Megatron Core's BlendedMegatronDatasetBuilder built for
each case (GPTDataset and BlendedDataset, Megatron-LM main of 2026-08-22, on the CPU), written by
tests/fixtures/megatron/write_order_digests.py, whose docstring says how to run it again. The digests
are of int64 arrays, so that Megatron-LM's int32/uint32 choices do not matter.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

VOCAB = 64  # the token ids fit the tiny test model's vocabulary
DOCUMENTS = (20, 30, 25, 8)  # documents in dataset k


def documents(dataset: int) -> list[np.ndarray]:
    """Dataset `dataset`'s documents: 3-39 random tokens each, from a seed of its own."""
    rng = np.random.RandomState(100 + dataset)
    sizes = rng.randint(3, 40, size=DOCUMENTS[dataset])
    return [rng.randint(0, VOCAB, size=int(n)).astype(np.uint16) for n in sizes]


@dataclass(frozen=True)
class Case:
    datasets: tuple[int, ...]  # which datasets the blend names, in order
    weights: tuple[float, ...] | None  # None: one prefix without a weight
    split: str
    seq_length: int
    num_samples: int
    seed: int

    def data_path(self, prefixes: list[str]) -> list:
        """Megatron-LM's --data-path for the datasets' prefixes (megamath's data.data_path takes the same)."""
        if self.weights is None:
            return [prefixes[0]]
        return [item for pair in zip(self.weights, prefixes) for item in pair]


CASES = {
    # 444 tokens, 27 samples an epoch: 83 samples need 3 epochs, the last 28 samples into it (>= 80 %
    # of 27), so all three epochs' documents are shuffled together, and all their samples; without a weight
    # there is no blend and no surplus (84 samples would need a fourth epoch)
    "one_prefix_epochs_together": Case((0,), None, "100,0,0", 16, 83, 1234),
    # a weight makes it a blend of one: 55 samples are built as 56, which needs a third epoch, 1 sample
    # into it, so that epoch is shuffled apart
    "weighted_prefix_final_epoch_apart": Case((0,), (1.0,), "100,0,0", 16, 55, 7),
    # three datasets cut 90,10,0 and blended 3:2:5; the small third one is read over several epochs
    "blend_with_split": Case((1, 2, 3), (3.0, 2.0, 5.0), "90,10,0", 16, 60, 99),
}


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array, dtype=np.int64)).tobytes()).hexdigest()[:16]


MEGATRON: dict[str, dict[str, str]] = {
    "one_prefix_epochs_together": {
        "samples": "4f30305c942bc2ab",
        "doc_idx.0": "7f9c091e1d97efc4", "sample_idx.0": "394a3b98fc76c228", "shuffle_idx.0": "d6c6d2ff9ec74fd0",
    },
    "weighted_prefix_final_epoch_apart": {
        "samples": "3e9b410d17ea3bcf",
        "dataset_index": "0" * 55, "dataset_sample_index": "e52e1ac0cb17368b",
        "doc_idx.0": "3a64d8d5f25802a8", "sample_idx.0": "dacdb83a17766ffc", "shuffle_idx.0": "5acd19cc4abc0e13",
    },
    "blend_with_split": {
        "samples": "0d1e9c0aed4623e6",
        "dataset_index": "201202120202120212020212021202021202120202120212020212021202",
        "dataset_sample_index": "2358d62b1268edef",
        "doc_idx.0": "b6f92e3ea7706300", "sample_idx.0": "fcbc782c323dbf87", "shuffle_idx.0": "ca4ad8df0f8f70b3",
        "doc_idx.1": "1176a9f0ec4da0a9", "sample_idx.1": "f011e6dbeb2b6187", "shuffle_idx.1": "4606beaf05a47ddb",
        "doc_idx.2": "b85ed75ac61c5d01", "sample_idx.2": "c2e6fd00e4a52620", "shuffle_idx.2": "9eb60bdc51f185ae",
    },
}
