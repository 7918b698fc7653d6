"""Which dataset each sample of a mixture comes from: the greedy blending rule and `--data-path` parsing.

Megatron-LM mixes datasets deterministically rather than by sampling: sample i goes to the dataset
furthest behind its target share, so after any prefix of n samples every dataset holds its weight * n
samples to within about one. `build_blending_indices` runs that loop in C++ (O(samples * datasets));
`build_blending_indices_ref` is the numpy reference the tests hold it to.

Megatron's loop differs in one detail: it measures the deficit against a target of max(i, 1) samples,
so samples 0 and 1 share one target; megamath's target is i + 1, the count once sample i is placed.
Shares and the within-one bound are the same, but the two sequences differ at some positions (weights
1:3 give 1 0 1 1 1 0 1 1 here, 1 0 1 1 0 1 1 1 in Megatron-LM). `megatron_target=True` runs Megatron's
rule (data.sample_order: megatron, see megatron_order.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megamath import _helpers

MAX_DATASETS = np.iinfo(np.int16).max  # dataset_index is int16, as in Megatron


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """(D,) float64 weights / sum, after rejecting what cannot be a mixture."""
    weights = np.array(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0:
        raise ValueError(f"weights must be a non-empty 1-D list, got shape {weights.shape}")
    if len(weights) > MAX_DATASETS:
        raise ValueError(f"at most {MAX_DATASETS} datasets can be blended, got {len(weights)}")
    bad = ~np.isfinite(weights)
    if bad.any():
        at = int(np.argmax(bad))
        raise ValueError(f"weights must be finite, got {weights[at]} at position {at}")
    bad = weights <= 0
    if bad.any():
        at = int(np.argmax(bad))
        raise ValueError(f"weights must be positive, got {weights[at]} at position {at}")
    with np.errstate(over="ignore"):  # reported just below, with advice
        total = weights.sum()
    if not np.isfinite(total):
        raise ValueError(f"weights sum to {total}; scale them down")
    return weights / total


def _check_num_samples(num_samples: int) -> int:
    if not 0 < int(num_samples) < 2**63:
        raise ValueError(f"num_samples must be positive and fit in 64 bits, got {num_samples}")
    return int(num_samples)


def build_blending_indices(weights: Sequence[float] | np.ndarray, num_samples: int,
                           megatron_target: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index (num_samples,) int16, dataset_sample_index (num_samples,) int64), in C++.

    Sample i comes from dataset argmax_d w[d] * t - count[d] with t = i + 1 (Megatron-LM's max(i, 1) with
    megatron_target), ties to the lowest d, w normalized to sum 1, and is that dataset's count[d]-th sample.
    """
    normalized = normalize_weights(weights)
    return _helpers.build_blending_indices(normalized, _check_num_samples(num_samples), bool(megatron_target))


def build_blending_indices_ref(weights: Sequence[float] | np.ndarray, num_samples: int,
                               megatron_target: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference of `build_blending_indices`: one vectorised argmax per sample."""
    w = normalize_weights(weights)  # (D,)
    num_samples = _check_num_samples(num_samples)
    count = np.zeros(len(w), dtype=np.float64)  # (D,) exact integers in float64, like the C++ cast
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        target = float(max(i, 1)) if megatron_target else float(i + 1)
        d = int(np.argmax(w * target - count))  # argmax takes the first of equal maxima
        dataset_index[i] = d
        dataset_sample_index[i] = int(count[d])
        count[d] += 1
    return dataset_index, dataset_sample_index


def parse_data_path(items: Sequence[str]) -> tuple[list[float], list[str]]:
    """Megatron's `--data-path`: `W1 PREFIX1 W2 PREFIX2 ...`, or one PREFIX alone (weight 1).

    Returns (weights, prefixes) as given (not normalized).
    """
    items = list(items)
    if not items:
        raise ValueError("--data-path needs at least one dataset prefix")
    if len(items) == 1:
        if _as_number(items[0]) is not None:
            raise ValueError(f"--data-path {items[0]} is a weight without a dataset prefix")
        return [1.0], items
    if len(items) % 2:
        raise ValueError(f"--data-path takes WEIGHT PREFIX pairs (or one PREFIX alone), got {len(items)} "
                         f"items: {' '.join(items)}")
    weights, prefixes = [], []
    for k in range(0, len(items), 2):
        raw, prefix = items[k], items[k + 1]
        weight = _as_number(raw)
        if weight is None:
            raise ValueError(f"--data-path weight {raw!r} (item {k + 1}) is not a number; "
                             "expected WEIGHT PREFIX pairs")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"--data-path weight {raw} for {prefix} must be positive and finite")
        weights.append(weight)
        prefixes.append(prefix)
    return weights, prefixes


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
