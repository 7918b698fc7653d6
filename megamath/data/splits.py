"""Megatron-LM's `--split`: train, validation and test parts cut out of each dataset's documents.

`--split 969,30,1` gives every `--data-path` prefix's first 96.9 % of documents to training, the next 3 % to
validation and the last 0.1 % to a test set. The cut follows Megatron-LM (megatron.core.datasets): the shares
are normalized, their running sums (0, a, a + b, 1) are the parts' bounds as fractions, and part k holds
documents [round(lo_k · N), round(hi_k · N)) of the N sequences, with Python's round (halves to even). A zero
share is no part at all. GPT-NeoX's rule (Megatron-LM's older one, `rule="neox"`, used with data.sample_order
neox) rounds each share's document count, adds them up and shifts every bound by the excess over N, so a bound
can differ by one document between the two.

Contiguous parts, not a shuffle, so the held-out documents are the same whatever the seed, sample count or
sequence length: a validation loss can be compared across runs of one corpus.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

PARTS = ("train", "valid", "test")
PART_NAMES = {"train": "training", "valid": "validation", "test": "test"}


class SplitParts(NamedTuple):
    """The sequence ids of each part of one dataset: (count,) int64 arrays, None for a zero share."""

    train: np.ndarray | None
    valid: np.ndarray | None
    test: np.ndarray | None


def parse_split(split: str | Sequence[float], key: str = "data.split") -> tuple[float, float, float]:
    """(train, valid, test) shares summing to 1 from '969,30,1', '98/2' or [99, 1]: missing shares are 0.
    `key` names the setting in errors (`--split` on a command line)."""
    if isinstance(split, str):
        items = [item.strip() for item in re.split(r"[,/]", split)]
    elif isinstance(split, (list, tuple)):
        items = list(split)
    elif isinstance(split, (int, float)) and not isinstance(split, bool):
        items = [split]  # YAML reads `split: 100` as a number
    else:
        raise ValueError(f"{key} must be a string such as '969,30,1' or a list of up to 3 numbers, got {split!r}")
    if not 1 <= len(items) <= 3:
        raise ValueError(f"{key} {split!r}: give 1 to 3 shares (train, validation, test), got {len(items)}")
    shares = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            share = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{key} {split!r}: {item!r} is not a number; expected shares such as '969,30,1'") \
                from None
        if not math.isfinite(share) or share < 0:
            raise ValueError(f"{key} {split!r}: shares must be finite and >= 0, got {item}")
        shares.append(share)
    shares += [0.0] * (3 - len(shares))
    total = sum(shares)
    if shares[0] <= 0:
        raise ValueError(f"{key} {split!r} gives training no documents: its first share must be positive")
    return tuple(share / total for share in shares)


def canonical_split(split: str | Sequence[float], key: str = "data.split") -> str:
    """The split as written in configs and checkpoints, '969,30,1': the shares given, before normalizing."""
    parse_split(split, key)  # the errors first
    items = ([item.strip() for item in re.split(r"[,/]", split)] if isinstance(split, str)
             else list(split) if isinstance(split, (list, tuple)) else [split])
    return ",".join(_exact(float(item)) for item in items)


def _exact(share: float) -> str:
    """The share as written back without losing a digit (a rounded share would move a bound): 969, 66.6666667."""
    text = repr(share)
    return text[:-2] if text.endswith(".0") else text


SPLIT_RULES = ("megatron", "neox")


def split_documents(num_documents: int, split: str | Sequence[float], rule: str = "megatron") -> SplitParts:
    """Each part's sequence ids among num_documents, by Megatron-LM's rule or GPT-NeoX's (see the module's
    docstring)."""
    shares = parse_split(split)
    if rule == "neox":  # rounded counts, then every bound moved by the excess; an empty part is no part
        bounds = [0]
        for share in shares:
            bounds.append(bounds[-1] + int(round(share * float(num_documents))))
        excess = bounds[-1] - num_documents
        bounds = [0] + [bound - excess for bound in bounds[1:]]
        return SplitParts(*(np.arange(lo, hi, dtype=np.int64) if hi > lo else None
                            for lo, hi in zip(bounds[:-1], bounds[1:])))
    if rule != "megatron":
        raise ValueError(f"rule must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")
    bounds = np.cumsum((0.0, *shares)).tolist()  # 0, a, a + b, 1 (as running float sums)
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            parts.append(None)
            continue
        begin, end = int(round(lo * float(num_documents))), int(round(hi * float(num_documents)))
        parts.append(np.arange(begin, end, dtype=np.int64))
    return SplitParts(*parts)


def part_names(prefixes: Sequence[str], taken: Sequence[str] = (),
               suffixes: Sequence[str] = ("_text_document", "_document", "_train")) -> list[str]:
    """A report name per prefix, e.g. for its validation and test parts: `.../arxiv_train_text_document` ->
    `arxiv` (the file name without `suffixes`); the file name, then the prefix itself, where the short name is
    already used (by `taken` too)."""
    used, names = set(taken), []
    for prefix in prefixes:
        short = Path(prefix).name
        for suffix in suffixes:
            short = short[: -len(suffix)] if short.endswith(suffix) and len(short) > len(suffix) else short
        name = next((n for n in (short, Path(prefix).name, str(prefix)) if n not in used), str(prefix))
        used.add(name)
        names.append(name)
    return names


class SplitCut(NamedTuple):
    """A blend's datasets cut by data.split, as training reads them."""

    train: list[np.ndarray | None]  # per dataset, the ids it trains on (None: all)
    valid: dict  # {name: (dataset, ids)} the validation parts
    test: dict  # {name: (dataset, ids)} the test parts
    lines: list[str]  # what the run's log says of the cut


def cut_splits(datasets: Sequence, prefixes: Sequence[str], split: str | None, seq_length: int,
               taken: Sequence[str] = (), key: str = "data.split", rule: str = "megatron") -> SplitCut:
    """Each dataset's parts under `split` (None: train on everything), refusing a part too small for one sample.

    datasets: IndexedDatasets (anything with `sizes`), one per prefix; taken: report names already in use;
    rule: whose cut, Megatron-LM's or GPT-NeoX's (split_documents).
    """
    if split is None:
        return SplitCut([None] * len(datasets), {}, {}, [])
    names = part_names(prefixes, taken)
    train, valid, test, lines = [], {}, {}, [f"{key} {split}: documents cut in order into train, validation "
                                               "and test parts"]
    for dataset, prefix, name in zip(datasets, prefixes, names):
        sizes = np.asarray(dataset.sizes)
        parts = split_documents(len(sizes), split, rule)
        for part, ids in zip(PARTS, parts):
            if ids is None:
                continue
            tokens = int(sizes[ids].sum(dtype=np.int64))
            if tokens < seq_length + 1:
                what = f"documents [{ids[0]}, {ids[-1] + 1})" if len(ids) else "none"
                raise ValueError(f"{key} {split} gives the {PART_NAMES[part]} part of {prefix} {what} of its "
                                 f"{len(sizes)} documents, {tokens} tokens: fewer than the seq_length + 1 = "
                                 f"{seq_length + 1} that one sample needs; give that part a larger share (0: no such "
                                 "part), or more data")
        train.append(parts.train)
        again = prefix in prefixes[:len(train) - 1]  # listed twice in the blend: its held-out parts count once
        if parts.valid is not None and not again:
            valid[name] = (dataset, parts.valid)
        if parts.test is not None and not again:
            test[name] = (dataset, parts.test)
        counts = ", ".join(f"{part} {len(ids):,}" for part, ids in zip(PARTS, parts) if ids is not None)
        lines.append(f"  {prefix}: {len(sizes):,} documents: {counts}" + (
            f" (reported as {name})" if (parts.valid is not None or parts.test is not None) and not again else ""))
    return SplitCut(train, valid, test, lines)
