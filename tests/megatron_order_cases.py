"""The cases of tests/test_megatron_order.py, and what Megatron-LM's and GPT-NeoX's own datasets gave for them.

Each case is one trainer's data setup (its blend, split, seed, sequence length, and train iterations ×
global batch = num_samples) over small datasets whose documents come from `documents`. BUILT holds
SHA-256 digests of the arrays and samples that the trainer's own code built for each case, on the CPU:
Megatron Core's BlendedMegatronDatasetBuilder (GPTDataset, BlendedDataset; Megatron-LM main of 2026-08-22),
written by tests/fixtures/megatron/write_order_digests.py, and GPT-NeoX's GPT2Dataset and BlendableDataset
as its data_utils builds them (the llemma branch; main gives the same), written by
tests/fixtures/neox/write_order_digests.py. Their docstrings say how to run them again. The digests are of
int64 arrays, so that the trainers' int32/uint32 choices do not matter.
"""
from __future__ import annotations

import hashlib
import pprint
import tempfile
from dataclasses import dataclass
from typing import Callable

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
    trainer: str  # megatron or neox, the data.sample_order that reads it
    datasets: tuple[int, ...]  # which datasets the blend names, in order
    weights: tuple[float, ...] | None  # None: one prefix without a weight (GPT-NeoX: data_path)
    split: str | None
    seq_length: int
    num_samples: int
    seed: int

    def data_path(self, prefixes: list[str]) -> list:
        """The blend as megamath's data.data_path (and Megatron-LM's --data-path) writes it; a weighted blend
        is GPT-NeoX's train_data_paths and train_data_weights."""
        if self.weights is None:
            return [prefixes[0]]
        return [item for pair in zip(self.weights, prefixes) for item in pair]


CASES = {
    # 444 tokens, 27 samples an epoch: 83 samples need 3 epochs, the last 28 samples into it (>= 80 %
    # of 27), so all three epochs' documents are shuffled together, and all their samples; without a weight
    # there is no blend and no surplus (84 samples would need a fourth epoch)
    "one_prefix_epochs_together": Case("megatron", (0,), None, "100,0,0", 16, 83, 1234),
    # a weight makes it a blend of one: 55 samples are built as 56, which needs a third epoch, 1 sample
    # into it, so that epoch is shuffled apart
    "weighted_prefix_final_epoch_apart": Case("megatron", (0,), (1.0,), "100,0,0", 16, 55, 7),
    # three datasets cut 90,10,0 and blended 3:2:5; the small third one is read over several epochs
    "blend_with_split": Case("megatron", (1, 2, 3), (3.0, 2.0, 5.0), "90,10,0", 16, 60, 99),
    # weights 12:11:2, normalized twice as Megatron-LM does, tie-break differently at sample 15 than once
    "blend_decided_by_the_last_bit": Case("megatron", (1, 2, 3), (12.0, 11.0, 2.0), "100,0,0", 16, 30, 5),
    # GPT-NeoX's data_path cut by split 45,45,10: its rule trains on documents [0, 12) of 25 (Megatron-LM's
    # on [0, 11)); 30 samples of that part need 4 epochs
    "neox_data_path_split": Case("neox", (2,), None, "45,45,10", 16, 30, 1234),
    # train_data_paths blended 3:2:5 and built for ⌈N·w·1.005⌉ = 18, 12, 30 samples; the third dataset's 30 need 3
    # epochs, where Megatron-LM's ⌈⌈w·N⌉·1.005⌉ = 31 would need 4
    "neox_train_data_paths": Case("neox", (1, 2, 3), (3.0, 2.0, 5.0), None, 16, 59, 42),
    # one train_data_paths entry is a blend of one, built for 56 of 55 samples: a third epoch, 1 sample into it,
    # which Megatron-LM would shuffle apart and GPT-NeoX shuffles with the others
    "neox_one_train_path": Case("neox", (0,), (1.0,), None, 16, 55, 7),
}


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array, dtype=np.int64)).tobytes()).hexdigest()[:16]


def blend_digests(dataset_index, dataset_sample_index, num_samples: int) -> dict[str, str]:
    """BUILT's entries for a blend's first num_samples: the dataset of each (as digits), and a digest of the rest."""
    return {"dataset_index": "".join(str(int(d)) for d in dataset_index[:num_samples]),
            "dataset_sample_index": digest(dataset_sample_index[:num_samples])}


def gpt_digests(k: int, doc_idx, sample_idx, shuffle_idx) -> dict[str, str]:
    """BUILT's entries for the GPT dataset of the blend's k-th dataset."""
    return {f"doc_idx.{k}": digest(doc_idx), f"sample_idx.{k}": digest(sample_idx),
            f"shuffle_idx.{k}": digest(shuffle_idx)}


def print_built(trainer: str, case_digests: Callable[[Case, str], dict[str, str]]) -> None:
    """What a write_order_digests.py script prints: BUILT's entries for `trainer`'s cases, each built by
    `case_digests(case, folder)` in a fresh temporary folder."""
    built = {}
    for name, case in CASES.items():
        if case.trainer == trainer:
            with tempfile.TemporaryDirectory() as folder:
                built[name] = case_digests(case, folder)
    pprint.pprint(built, width=120, sort_dicts=False)


BUILT: dict[str, dict[str, str]] = {
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
    "blend_decided_by_the_last_bit": {
        "samples": "899d05bda39a7e29",
        "dataset_index": "012010101010101021010101001201",
        "dataset_sample_index": "982df30de0c066c7",
        "doc_idx.0": "279404dd7eeae749", "sample_idx.0": "8c7c279ff183354e", "shuffle_idx.0": "2ff83a740e6fdff9",
        "doc_idx.1": "108f983bc2ce280c", "sample_idx.1": "35f0f83921e3d4fc", "shuffle_idx.1": "a887907a669e2a0a",
        "doc_idx.2": "f6a8d828eacb317a", "sample_idx.2": "6d597a05ffb2f0f3", "shuffle_idx.2": "9e4c576b0687ec29",
    },
    "neox_data_path_split": {
        "samples": "7550cb5c431760bd",
        "doc_idx.0": "077f93f3dcd33fa0", "sample_idx.0": "b45ebf8a2da0dd42", "shuffle_idx.0": "75924d0520421e66",
    },
    "neox_train_data_paths": {
        "samples": "93b6986ce5d2ddcf",
        "dataset_index": "20120212020212021202021202120202120212020212021202021202120",
        "dataset_sample_index": "c56f59cbe878cbbb",
        "doc_idx.0": "ea72de79c859fe88", "sample_idx.0": "16c2fe0700ef1de1", "shuffle_idx.0": "b7b6b7e6cc08da9c",
        "doc_idx.1": "9ac77d1c54713a65", "sample_idx.1": "938ea92964764146", "shuffle_idx.1": "fda2ec4d3fc5b2be",
        "doc_idx.2": "f0fa00cb28006441", "sample_idx.2": "4d1e3d15d2b14df7", "shuffle_idx.2": "0ade8b5ee4cdb71b",
    },
    "neox_one_train_path": {
        "samples": "08a8a437ea0bbbc4",
        "dataset_index": "0" * 55, "dataset_sample_index": "e52e1ac0cb17368b",
        "doc_idx.0": "b6821df38fd1e570", "sample_idx.0": "41485e03f6da7a04", "shuffle_idx.0": "fa33879e15f50c21",
    },
}
