"""Writing Megatron-LM's indexed datasets (`.bin`/`.idx`, format in `indexed_dataset`) atomically.

Both files are written under temporary names and renamed into place by `finalize()`, `.idx` last,
because the `.idx` is what marks a dataset complete: a crash leaves either the old dataset or none,
never a new `.idx` beside a half-written `.bin`.
"""
from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import numpy as np

from megamath.atomic_io import fsync_path, naming_write_errors, remove_dead_temporaries, temp_tag
from megamath.data.indexed_dataset import (
    HEADER, MAGIC, VERSION, IndexedDataset, data_file_path, dtype_code, index_file_path,
)

_INT32_MAX = np.iinfo(np.int32).max
_WRITE_BUFFER = 16 << 20  # bytes; small add_item calls are batched into writes this large
_temp_counter = itertools.count()  # makes temporary names unique within one process
TEMP_MARK = ".tmp-"  # PREFIX.bin.tmp-HOST-PID-N and PREFIX.idx.tmp-HOST-PID-N until finalize() publishes them


def remove_dead_writers_temporaries(folder: str | Path, prefix: str | Path | None = None) -> list[Path]:
    """Delete the temporaries of writers killed before they finished (as large as their output), those of
    `prefix`'s dataset or, without it, of every dataset in `folder`; call it holding the folder's lock."""
    names = (f"{Path(prefix).name}.bin{TEMP_MARK}", f"{Path(prefix).name}.idx{TEMP_MARK}") if prefix else \
        (f".bin{TEMP_MARK}", f".idx{TEMP_MARK}")
    return sorted(p for name in names for p in remove_dead_temporaries(folder, name, anywhere=prefix is None))


class _GrowingArray:
    """An append-only int64 array: scalars batch in a list, whole arrays are kept as chunks (no copies)."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._scalars: list[int] = []
        self.count = 0
        self.last = 0

    def append(self, value: int) -> None:
        self._scalars.append(value)
        self.count += 1
        self.last = value

    def extend(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if self._scalars:
            self._chunks.append(np.asarray(self._scalars, dtype=np.int64))
            self._scalars = []
        self._chunks.append(np.asarray(values, dtype=np.int64))
        self.count += len(values)
        self.last = int(values[-1])

    def to_numpy(self) -> np.ndarray:
        tail = [np.asarray(self._scalars, dtype=np.int64)] if self._scalars else []
        return np.concatenate(self._chunks + tail) if self._chunks or tail else np.zeros(0, np.int64)


class IndexedDatasetWriter:
    """Build a dataset with Megatron's builder semantics: `add_item` appends a sequence, `end_document`
    closes the document made of the sequences since the previous boundary.

    Use as a context manager: a normal exit finalizes, an exception aborts, so a failed run never
    leaves files that look like a complete dataset, and an older dataset under the same prefix stays
    intact until the new one is complete.
    """

    def __init__(self, prefix: str | Path, dtype) -> None:
        self.dtype, self._code = dtype_code(dtype)
        self.prefix = Path(prefix)
        self._bin_path, self._idx_path = data_file_path(prefix), index_file_path(prefix)
        self._bin_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{TEMP_MARK}{temp_tag()}-{next(_temp_counter)}"  # the writer's host and pid: see remove_dead_temporaries
        self._bin_tmp = self._bin_path.with_name(self._bin_path.name + tag)
        self._idx_tmp = self._idx_path.with_name(self._idx_path.name + tag)
        self._bin = open(self._bin_tmp, "wb", buffering=_WRITE_BUFFER)
        self._sizes = _GrowingArray()  # tokens per sequence
        self._doc_ends = _GrowingArray()  # sequence count at each document boundary (Megatron's doc idx[1:])
        self._state = "open"

    # --- adding data ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"writer for {self.prefix} is already {self._state}")

    def _as_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens as a contiguous 1-D array of our dtype; refuses casts that would change values."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if tokens.dtype != self.dtype:
            if tokens.size == 0:  # `[]` is float64 to numpy; with no values there is nothing to check
                return np.zeros(0, self.dtype)
            if self.dtype.kind in "iu":
                if tokens.dtype.kind not in "biu":
                    raise ValueError(f"tokens must be integers for a {self.dtype} dataset, got {tokens.dtype}")
                if tokens.size:
                    lo, hi, info = int(tokens.min()), int(tokens.max()), np.iinfo(self.dtype)
                    if lo < info.min or hi > info.max:
                        raise ValueError(f"token ids in [{lo}, {hi}] do not fit the dataset dtype {self.dtype} "
                                         f"[{info.min}, {info.max}]")
            tokens = tokens.astype(self.dtype)
        return np.ascontiguousarray(tokens)

    def add_item(self, tokens: np.ndarray) -> None:
        """Append one sequence to the current document."""
        self._check_open()
        tokens = self._as_tokens(tokens)
        if len(tokens) > _INT32_MAX:
            raise ValueError(f"a sequence of {len(tokens)} tokens exceeds the format's int32 length")
        with naming_write_errors(self._bin_path):
            self._bin.write(memoryview(tokens).cast("B"))
        self._sizes.append(len(tokens))

    def end_document(self) -> None:
        """Close the current document (Megatron: record the sequence count as a document index)."""
        self._check_open()
        self._doc_ends.append(self._sizes.count)

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one sequence that is a whole document."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, sequences: np.ndarray | None = None) -> None:
        """Append documents given as flat tokens, in one write: `len(lengths)` one-sequence documents, or
        with `sequences` (documents,) that many sequences per document, `lengths` then being per sequence
        (Megatron's `add_document(tokens, lengths)` for each document in turn).

        The preprocessing hot path: no per-document Python work, only vectorised checks.
        """
        self._check_open()
        tokens = self._as_tokens(tokens)  # (sum(lengths),)
        lengths = np.asarray(lengths)  # (n_docs,) or with `sequences` (n_sequences,)
        if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
            raise ValueError(f"lengths must be a 1-D integer array, got {lengths.dtype} of shape {lengths.shape}")
        lengths = lengths.astype(np.int64)
        if lengths.size and (lengths.min() < 0 or lengths.max() > _INT32_MAX):
            raise ValueError(f"document lengths must lie in [0, {_INT32_MAX}], "
                             f"got [{lengths.min()}, {lengths.max()}]")
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        if sequences is None:
            sequences = np.ones(len(lengths), dtype=np.int64)  # (n_docs,)
        sequences = np.asarray(sequences)  # (n_docs,)
        if sequences.ndim != 1 or (sequences.size and (sequences.dtype.kind not in "iu" or sequences.min() < 0)):
            raise ValueError(f"sequences must be a 1-D array of counts, got {sequences.dtype} "
                             f"of shape {sequences.shape}")
        if int(sequences.sum()) != len(lengths):
            raise ValueError(f"sequences sum to {int(sequences.sum())} but {len(lengths)} lengths were given")
        if self._sizes.count != self._doc_ends.last:
            raise ValueError("add_documents() needs the current document closed: call end_document() first")
        with naming_write_errors(self._bin_path):
            self._bin.write(memoryview(tokens).cast("B"))
        first = self._sizes.count
        self._sizes.extend(lengths)
        self._doc_ends.extend(first + np.cumsum(sequences, dtype=np.int64))

    def add_dataset(self, prefix: str | Path) -> None:
        """Append a whole dataset: its tokens are copied, its sequence and document indices are offset
        by what this writer already holds (its leading 0 is dropped, as in Megatron's `add_index`)."""
        self._check_open()
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot add {other.prefix}: its dtype {other.dtype} differs from this "
                             f"writer's {self.dtype}")
        if self._sizes.count != self._doc_ends.last:
            raise ValueError(f"cannot add {other.prefix} while a document is open: call end_document() first")
        offset = self._sizes.count
        with open(data_file_path(prefix), "rb") as src, naming_write_errors(self._bin_path):
            shutil.copyfileobj(src, self._bin, length=_WRITE_BUFFER)
        self._sizes.extend(other.sizes)
        self._doc_ends.extend(other.document_indices[1:] + offset)

    # --- publishing ----------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Write the `.idx` and publish both files: fsync, drop any old `.idx` (so it can never pair
        with the new `.bin`), rename the `.bin`, then rename the `.idx` (the commit marker) last."""
        self._check_open()
        if self._sizes.count != self._doc_ends.last:
            raise ValueError(f"{self._sizes.count - self._doc_ends.last} sequence(s) of {self.prefix} were "
                             "added after the last end_document(): close the document before finalize()")
        with naming_write_errors(self._bin_path):
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        sizes = self._sizes.to_numpy()  # (N,)
        pointers = np.zeros(len(sizes), dtype=np.int64)  # (N,) exclusive prefix sum, in bytes
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.concatenate([[0], self._doc_ends.to_numpy()]).astype(np.int64)  # (D,)
        with naming_write_errors(self._idx_path), open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_indices)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_indices.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._idx_path.unlink(missing_ok=True)
        os.replace(self._bin_tmp, self._bin_path)
        os.replace(self._idx_tmp, self._idx_path)
        fsync_path(self._idx_path.parent)
        self._state = "finalized"

    def abort(self) -> None:
        """Close and delete the temporaries; files already under the final names are left alone."""
        if self._state == "finalized":
            return
        try:
            self._bin.close()
        except OSError:  # the buffered tail cannot be flushed (the disk is full): the file goes anyway
            pass
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)
        self._state = "aborted"

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.finalize()
        except BaseException:
            self.abort()
            raise
