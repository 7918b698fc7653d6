"""Whole-dataset operations on indexed datasets: merging (Megatron's merge_datasets tool) and document views.

Library side of `megamath merge` and `megamath inspect`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter, remove_dead_writers_temporaries
from megamath.run_lock import FolderLock


def strip_extension(prefix: str) -> str:
    """Accept `data.bin` / `data.idx` where a prefix is meant: a common slip, harmless to forgive."""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def document_lengths(dataset: IndexedDataset) -> np.ndarray:
    """Tokens per document (a document may span several sequences)."""
    ends = np.zeros(len(dataset) + 1, dtype=np.int64)  # (N+1,) token offset of each sequence boundary
    np.cumsum(dataset.sizes, out=ends[1:])
    docs = np.asarray(dataset.document_indices)  # (D,)
    return ends[docs[1:]] - ends[docs[:-1]]  # (D-1,)


def document_tokens(dataset: IndexedDataset, d: int) -> np.ndarray:
    """All tokens of document `d`, its sequences joined."""
    first, last = int(dataset.document_indices[d]), int(dataset.document_indices[d + 1])
    parts = [dataset[i] for i in range(first, last)]
    return np.concatenate(parts) if parts else np.zeros(0, dataset.dtype)


def merge_datasets(prefixes: Sequence[str | Path], output_prefix: str | Path) -> IndexedDataset:
    """Concatenate datasets into `output_prefix`, equal byte for byte to writing all their documents
    into one writer. All inputs are validated, and their dtypes compared, before anything is written."""
    if not prefixes:
        raise ValueError("merge needs at least one input dataset")
    inputs = [IndexedDataset(p) for p in prefixes]
    for other in inputs[1:]:
        if other.dtype != inputs[0].dtype:
            raise ValueError(f"cannot merge {other.prefix} ({other.dtype}) with {inputs[0].prefix} "
                             f"({inputs[0].dtype}): all inputs must share one dtype")
    # One writer per folder, as preprocess: two merges into one prefix each published .bin then .idx, so the
    # second's unlink of the old .idx met the first between its renames: it failed on its own output, the
    # files left were the other's, and the pair could have mixed one merge's .bin with the other's .idx.
    with FolderLock(Path(output_prefix).parent, "merge"):
        remove_dead_writers_temporaries(Path(output_prefix).parent, output_prefix)  # a killed merge's
        with IndexedDatasetWriter(output_prefix, inputs[0].dtype) as writer:
            for p in prefixes:
                writer.add_dataset(p)
        return IndexedDataset(output_prefix)
