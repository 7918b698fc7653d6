"""Megatron-LM's training sample order, reproduced: `data.sample_order: megatron`.

Why a separate file: megamath's own order (sample_index.py, blending.py) differs from Megatron-LM's on
purpose, but a run that moves over from Megatron-LM may need Megatron-LM's samples in Megatron-LM's order,
sample for sample (to compare the two trainers' loss curves on the same data, or to keep a recipe's data
exactly). This file holds the arithmetic in which the two differ, as Megatron Core's GPTDataset and
BlendedMegatronDatasetBuilder do it (checked against Megatron-LM main of 2026-08-22):

- Epochs: when num_samples needs E > 1 passes over the documents, doc_idx is E copies of the documents
  shuffled together (a document may come twice before another comes once), except that the final epoch
  is shuffled apart, and its samples too, when it is under 80 % used (`separates_final_epoch`).
- Blend sizes: each dataset of a weighted --data-path is asked for ⌈⌈w·N⌉·1.005⌉ samples
  (`--mid-level-dataset-surplus` 0.005), which decides its epochs and so its order. A lone prefix without a
  weight is read without a blend and asked for N.
- Blend order: sample i goes to argmax_d w[d]·max(i, 1) − count[d] (megamath: i + 1), the weights
  normalized twice as Megatron-LM's builder and BlendedDataset each normalize them.
- Seeds: every dataset's indices use the run's seed (megamath derives one per dataset).

For one epoch without a blend the two orders are the same. What is shared (the sample index walk, the
shuffle index) comes from sample_index.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megamath.data import blending, sample_index
from megamath.data.blending import normalize_weights

SAMPLE_ORDERS = ("megamath", "megatron")
BLEND_SURPLUS = 0.005
"""Megatron-LM's --mid-level-dataset-surplus default: the share of extra samples each blended dataset builds."""
FINAL_EPOCH_THRESHOLD = 0.80
"""Megatron-LM shuffles the final epoch apart when fewer than this share of its samples are used."""


def check_sample_order(order: str, key: str = "sample_order") -> str:
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"{key} must be one of {', '.join(SAMPLE_ORDERS)}, got {order!r}")
    return order


def separates_final_epoch(tokens_per_epoch: int, seq_length: int, num_samples: int, num_epochs: int) -> bool:
    """Whether Megatron-LM shuffles the last of num_epochs epochs (documents and samples) apart: when the
    samples it contributes are fewer than 80 % of an epoch's, so that they do not crowd the run's end."""
    if num_epochs == 1:
        return False
    before_final = sample_index.samples_in((num_epochs - 1) * tokens_per_epoch, seq_length)
    per_epoch = sample_index.samples_in(tokens_per_epoch, seq_length)
    return num_samples - before_final < int(FINAL_EPOCH_THRESHOLD * per_epoch)


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                  separate_final: bool) -> np.ndarray:
    """(num_epochs * len(documents),) int64: the epochs' copies of `documents` shuffled together (the last
    copy shuffled on its own when `separate_final`)."""
    documents = np.asarray(documents, dtype=np.int64)
    if separate_final and num_epochs > 1:
        return np.concatenate([build_doc_idx(documents, num_epochs - 1, rng, False),
                               build_doc_idx(documents, 1, rng, False)])
    doc_idx = np.tile(documents, num_epochs)  # (E * D,)
    rng.shuffle(doc_idx)
    return doc_idx


def build_gpt_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int,
                      seed: int) -> dict[str, np.ndarray]:
    """doc_idx, sample_idx and shuffle_idx as Megatron-LM's GPTDataset builds them for num_samples samples
    (the same shapes and meaning as `sample_index.build_gpt_indices`)."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    num_epochs = sample_index.num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = separates_final_epoch(tokens_per_epoch, seq_length, num_samples, num_epochs)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate)
    total = sample_index.samples_in(num_epochs * tokens_per_epoch, seq_length)  # S
    sample_idx = sample_index.build_sample_index(sizes, doc_idx, seq_length, total)
    first = sample_index.samples_in((num_epochs - 1) * tokens_per_epoch, seq_length) if separate else total
    shuffle_idx = sample_index.build_shuffle_idx(total, first, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def build_blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-LM's blending indices (its max(i, 1) target) for weights normalized twice, as its builder and
    then its BlendedDataset each normalize them: the second pass can move the last bit, and with it a tie."""
    return blending.build_blending_indices(normalize_weights(weights), num_samples, megatron_target=True)


def requested_samples(weights: Sequence[float], num_samples: int, surplus: float = BLEND_SURPLUS) -> list[int]:
    """Samples each dataset of a weighted blend of num_samples is built for: ⌈⌈w·N⌉·(1 + surplus)⌉, in
    Python floats as Megatron-LM computes them (weights normalized once)."""
    return [int(math.ceil(math.ceil(num_samples * w) * (1 + surplus))) for w in normalize_weights(weights).tolist()]
