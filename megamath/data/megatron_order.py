"""Megatron-LM's and GPT-NeoX's training sample orders, reproduced: `data.sample_order: megatron | neox`.

Why a separate file: megamath's own order (sample_index.py, blending.py) differs from theirs on purpose,
but a run that moves over from Megatron-LM or GPT-NeoX may need that trainer's samples in that trainer's
order, sample for sample (to compare the two trainers' loss curves on the same data, or to keep a recipe's
data exactly, as LLEMMA's GPT-NeoX config gives it). This file holds the arithmetic in which the orders
differ. `megatron` is Megatron Core's GPTDataset and BlendedMegatronDatasetBuilder (checked against
Megatron-LM main of 2026-08-22); `neox` is GPT-NeoX's GPT2Dataset and BlendableDataset, which are Megatron-LM's
older data code (checked against the llemma branch that trained LLEMMA, and main with its default packed
samples):

- Epochs: when num_samples needs E > 1 passes over the documents, doc_idx is E copies of the documents
  shuffled together (a document may come twice before another comes once), and so are all their samples.
  Megatron-LM shuffles the final epoch apart, documents and samples, when it is under 80 % used
  (`separates_final_epoch`); GPT-NeoX never does.
- Blend sizes: each dataset of a weighted blend is asked for ⌈⌈w·N⌉·1.005⌉ samples (Megatron-LM's
  `--mid-level-dataset-surplus` 0.005) or ⌈w·N·1.005⌉ (GPT-NeoX), which decides its epochs and so its order.
  A lone prefix without a weight (Megatron-LM's --data-path, GPT-NeoX's data_path) is read without a blend
  and asked for N.
- Blend order: sample i goes to argmax_d w[d]·max(i, 1) − count[d] (megamath: i + 1), the weights
  normalized twice, as each trainer normalizes them once where the sizes are computed and once in its
  blended dataset (numpy's sum both times in Megatron-LM; Python's, then numpy's, in GPT-NeoX).
- Seeds: every dataset's indices use the run's seed (megamath derives one per dataset).
- data.split: GPT-NeoX cuts it by Megatron-LM's older rule (splits.py).

For one epoch without a blend the three orders are the same. What is shared (the sample index walk, the
shuffle index) comes from sample_index.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megamath.data import blending, sample_index
from megamath.data.blending import normalize_weights

SAMPLE_ORDERS = ("megamath", "megatron", "neox")
BLEND_SURPLUS = 0.005
"""The share of extra samples each blended dataset is built for (Megatron-LM's --mid-level-dataset-surplus
default; GPT-NeoX's fixed 1.005 factor)."""
FINAL_EPOCH_THRESHOLD = 0.80
"""Megatron-LM shuffles the final epoch apart when fewer than this share of its samples are used."""


def check_sample_order(order: str, key: str = "sample_order") -> str:
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"{key} must be one of {', '.join(SAMPLE_ORDERS)}, got {order!r}")
    return order


def split_rule(order: str) -> str:
    """Whose rounding cuts data.split under `order` (splits.split_documents): GPT-NeoX's for its own order,
    Megatron-LM's for the others."""
    return "neox" if order == "neox" else "megatron"


def lone_prefix(data_path: Sequence | str) -> bool:
    """Whether `data_path` ([PREFIX], [W1, PREFIX1, ...] or `llemma`, a weighted mixture) is one prefix without a
    weight, which Megatron-LM's --data-path and GPT-NeoX's data_path read without a blend."""
    return not isinstance(data_path, str) and len(data_path) == 1


def blend_surplus(data_path: Sequence | str) -> float:
    """The surplus a trainer's blend of `data_path` is built with: none for a lone prefix, read unblended."""
    return 0.0 if lone_prefix(data_path) else BLEND_SURPLUS


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
                      seed: int, order: str) -> dict[str, np.ndarray]:
    """doc_idx, sample_idx and shuffle_idx as `order`'s GPT dataset builds them for num_samples samples (the
    same shapes and meaning as `sample_index.build_gpt_indices`)."""
    if order not in ("megatron", "neox"):
        raise ValueError(f"order must be megatron or neox, got {order!r}")
    documents, tokens_per_epoch, num_epochs = sample_index.plan_epochs(sizes, documents, num_samples, seq_length)
    separate = order == "megatron" and separates_final_epoch(tokens_per_epoch, seq_length, num_samples, num_epochs)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate)
    return sample_index.index_epochs(sizes, doc_idx, seq_length, tokens_per_epoch, num_epochs, separate, rng)


def _normalized_once(weights: Sequence[float], order: str) -> list[float]:
    """The weights as `order` normalizes them where it sizes the datasets: numpy's sum (Megatron-LM) or
    Python's (GPT-NeoX), which can differ in the last bit."""
    if order == "neox":
        total = sum(float(w) for w in weights)
        return [float(w) / total for w in weights]
    return normalize_weights(weights).tolist()


def build_blending_indices(weights: Sequence[float], num_samples: int, order: str) -> tuple[np.ndarray, np.ndarray]:
    """`order`'s blending indices (the max(i, 1) target) for the weights normalized twice, as the trainer does;
    the second, numpy normalization is blending.build_blending_indices's own. Normalizing again can move the
    last bit, and with it a tie."""
    return blending.build_blending_indices(_normalized_once(weights, order), num_samples, megatron_target=True)


def requested_samples(weights: Sequence[float], num_samples: int, order: str,
                      surplus: float = BLEND_SURPLUS) -> list[int]:
    """Samples each dataset of a weighted blend of num_samples is built for, in Python floats as the trainer
    computes them: ⌈⌈w·N⌉·(1 + surplus)⌉ (Megatron-LM) or ⌈N·w·(1 + surplus)⌉ (GPT-NeoX)."""
    normalized = _normalized_once(weights, order)
    if order == "neox":
        return [int(math.ceil(num_samples * w * (1 + surplus))) for w in normalized]
    return [int(math.ceil(math.ceil(num_samples * w) * (1 + surplus))) for w in normalized]
