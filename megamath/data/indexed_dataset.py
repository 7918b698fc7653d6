"""Megatron-LM's indexed dataset (the `MMIDIDX` format), byte for byte: writer, validating reader, merge.

Users bring `.bin`/`.idx` pairs made by Megatron-LM and expect ours to load in Megatron-LM, so the
layout is fixed (all little-endian):

    .idx  offset        field
          0             magic  b"MMIDIDX\\x00\\x00"   (9 bytes)
          9             version                      <Q, always 1
          17            dtype code                   <B (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                                         6 float64, 7 float32, 8 uint16)
          18            N, sequence count            <Q
          26            D, document-index count      <Q (documents + 1)
          34            sequence lengths             N x <i4 (tokens)
          34 + 4N       sequence pointers            N x <i8 (byte offset of each sequence in .bin)
          34 + 12N      document indices             D x <i8 (sequence where each document starts,
                                                         first 0, last N)
    .bin  the token arrays of all sequences, back to back.

Writes are atomic: both files are written under temporary names and renamed into place by
`finalize()`, `.idx` last, because the `.idx` is what marks a dataset complete. Reads are zero-copy:
one `np.memmap` per file and views into it, and validation is vectorised so that opening a
10-million-document index costs well under a second.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from megamath.atomic_io import fsync_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D
HEADER_BYTES = _HEADER.size  # 34
# Megatron-LM's DType enum; the codes are part of the file format.
DTYPE_CODES = {
    1: np.dtype("<u1"), 2: np.dtype("<i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"),
    5: np.dtype("<i8"), 6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2"),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_INT32_MAX = np.iinfo(np.int32).max
_WRITE_BUFFER = 16 << 20  # bytes; small add_item calls are batched into writes this large
_temp_counter = itertools.count()  # makes temporary names unique within one process


class IndexFormatError(ValueError):
    """A `.bin`/`.idx` pair that is not a valid indexed dataset; the message names the file and the fault."""


def best_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary: uint16 below 65,500 ids (Megatron's threshold), else int32."""
    return np.dtype("<u2") if vocab_size < 65_500 else np.dtype("<i4")


def data_file_path(prefix: str | Path) -> Path:
    """`prefix.bin`: the extension is appended, never substituted (prefixes may contain dots)."""
    return Path(f"{os.fspath(prefix)}.bin")


def index_file_path(prefix: str | Path) -> Path:
    """`prefix.idx`."""
    return Path(f"{os.fspath(prefix)}.idx")


def _dtype_code(dtype) -> tuple[np.dtype, int]:
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype not in _CODE_OF:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset (supported: {names})")
    return dtype, _CODE_OF[dtype]


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
        self.dtype, self._code = _dtype_code(dtype)
        self.prefix = Path(prefix)
        self._bin_path, self._idx_path = data_file_path(prefix), index_file_path(prefix)
        self._bin_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{next(_temp_counter)}"
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

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append `len(lengths)` one-sequence documents given as flat tokens, in one write.

        The preprocessing hot path: no per-document Python work, only vectorised checks.
        """
        self._check_open()
        tokens = self._as_tokens(tokens)  # (sum(lengths),)
        lengths = np.asarray(lengths)  # (n_docs,)
        if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
            raise ValueError(f"lengths must be a 1-D integer array, got {lengths.dtype} of shape {lengths.shape}")
        lengths = lengths.astype(np.int64)
        if lengths.size and (lengths.min() < 0 or lengths.max() > _INT32_MAX):
            raise ValueError(f"document lengths must lie in [0, {_INT32_MAX}], "
                             f"got [{lengths.min()}, {lengths.max()}]")
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        if self._sizes.count != self._doc_ends.last:
            raise ValueError("add_documents() needs the current document closed: call end_document() first")
        self._bin.write(memoryview(tokens).cast("B"))
        first = self._sizes.count
        self._sizes.extend(lengths)
        self._doc_ends.extend(np.arange(first + 1, first + 1 + len(lengths), dtype=np.int64))

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
        with open(data_file_path(prefix), "rb") as src:
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
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = self._sizes.to_numpy()  # (N,)
        pointers = np.zeros(len(sizes), dtype=np.int64)  # (N,) exclusive prefix sum, in bytes
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.concatenate([[0], self._doc_ends.to_numpy()]).astype(np.int64)  # (D,)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_indices)))
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
        self._bin.close()
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


class IndexedDataset:
    """Read a `.bin`/`.idx` pair without copying: sequences are views into one memmap of the `.bin`.

    Everything is validated on open (header, index length, `.bin` size, pointers, document indices),
    so later reads need no checks.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        self.dtype, n, d = _read_header(idx_path)
        self.version = VERSION
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")  # (34 + 12N + 8D,) bytes
        # Views at Megatron's (unaligned) offsets; numpy handles unaligned reads.
        self.sizes = index[HEADER_BYTES:HEADER_BYTES + 4 * n].view("<i4")  # (N,)
        self.pointers = index[HEADER_BYTES + 4 * n:HEADER_BYTES + 12 * n].view("<i8")  # (N,)
        self.document_indices = index[HEADER_BYTES + 12 * n:].view("<i8")  # (D,)
        self.num_tokens = _validate_index(idx_path, self.sizes, self.pointers, self.document_indices,
                                          self.dtype.itemsize)
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != self.num_tokens * self.dtype.itemsize:
            raise IndexFormatError(
                f"{bin_path}: has {bin_bytes} bytes but its index describes {self.num_tokens} tokens of "
                f"{self.dtype} = {self.num_tokens * self.dtype.itemsize} bytes")
        self.bin_bytes = bin_bytes
        # np.memmap refuses a 0-byte file: an empty dataset gets an empty array instead.
        tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_bytes else np.zeros(0, self.dtype)
        self._tokens = tokens.view(np.ndarray)  # (num_tokens,) plain ndarray over the memmap
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i):
        """Sequence `i` as a zero-copy view (negative indices count from the end); a slice gives a list."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {n} sequences")
        i = int(i) % n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `i` as a zero-copy view (to its end by default)."""
        sequence = self[i]
        if length is None:
            length = len(sequence) - offset
        if offset < 0 or length < 0 or offset + length > len(sequence):
            raise IndexError(f"span offset={offset} length={length} is outside sequence {i} "
                             f"of {len(sequence)} tokens in {self.prefix}")
        return sequence[offset:offset + length]

    def fingerprint(self) -> str:
        """A cheap, stable id of the content: sha256 of the `.idx` bytes and the `.bin` size.

        The index fixes dtype, every sequence length and the document structure; hashing the tokens
        themselves would cost a full read of the `.bin`, so a same-shaped rewrite is not detected.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with open(index_file_path(self.prefix), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            digest.update(struct.pack("<Q", self.bin_bytes))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}, dtype={self.dtype}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens})")


def _read_header(path: Path) -> tuple[np.dtype, int, int]:
    """Check magic, version, dtype code and the file length the header implies; return (dtype, N, D)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        raise IndexFormatError(f"{path}: bad magic {head[:len(MAGIC)]!r}, expected {MAGIC!r} "
                               "(not a Megatron MMIDIDX index)")
    if len(head) < HEADER_BYTES:
        raise IndexFormatError(f"{path}: truncated header: {len(head)} bytes, need {HEADER_BYTES}")
    _, version, code, n, d = _HEADER.unpack(head)
    if version != VERSION:
        raise IndexFormatError(f"{path}: unsupported version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise IndexFormatError(f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
    expected, actual = HEADER_BYTES + 12 * n + 8 * d, os.path.getsize(path)
    if actual < expected:
        raise IndexFormatError(f"{path}: truncated index: header says {n} sequences and {d} document "
                               f"indices ({expected} bytes) but the file has {actual} bytes")
    if actual > expected:
        raise IndexFormatError(f"{path}: index longer than it should be: header says {n} sequences and "
                               f"{d} document indices ({expected} bytes) but the file has {actual} bytes")
    if d < 1:
        raise IndexFormatError(f"{path}: document indices are empty; they must start at 0 and end at {n}")
    return DTYPE_CODES[code], n, d


def _validate_index(path: Path, sizes: np.ndarray, pointers: np.ndarray, doc_indices: np.ndarray,
                    itemsize: int) -> int:
    """Vectorised consistency checks of the three arrays; returns the total token count."""
    n = len(sizes)
    if n and sizes.min() < 0:
        bad = int(np.argmax(sizes < 0))
        raise IndexFormatError(f"{path}: sequence {bad} has negative length {int(sizes[bad])}")
    sizes64 = sizes.astype(np.int64)  # (N,)
    expected = np.zeros(n, dtype=np.int64)  # (N,) where each sequence must start, in bytes
    np.cumsum(sizes64[:-1] * itemsize, out=expected[1:])
    if not np.array_equal(pointers, expected):
        bad = int(np.argmax(pointers != expected))
        raise IndexFormatError(f"{path}: pointers inconsistent with sizes: sequence {bad} points at byte "
                               f"{int(pointers[bad])}, expected {int(expected[bad])}")
    if doc_indices[0] != 0:
        raise IndexFormatError(f"{path}: document indices must start at 0, got {int(doc_indices[0])}")
    if doc_indices[-1] != n:
        raise IndexFormatError(f"{path}: document indices must end at the sequence count {n}, "
                               f"got {int(doc_indices[-1])}")
    steps = np.diff(doc_indices)
    if len(steps) and steps.min() < 0:
        bad = int(np.argmax(steps < 0))
        raise IndexFormatError(f"{path}: document indices decrease at position {bad + 1}: "
                               f"{int(doc_indices[bad])} then {int(doc_indices[bad + 1])}")
    return int(sizes64.sum())


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
    with IndexedDatasetWriter(output_prefix, inputs[0].dtype) as writer:
        for p in prefixes:
            writer.add_dataset(p)
    return IndexedDataset(output_prefix)
