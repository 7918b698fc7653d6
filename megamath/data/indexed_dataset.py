"""Megatron-LM's indexed dataset (the `MMIDIDX` format), byte for byte: the format and the validating reader.

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

The writer is `indexed_dataset_writer.IndexedDatasetWriter` (atomic: `.idx` published last, as the
mark of completeness); merging and per-document views are in `dataset_tools`. Reads are zero-copy:
one `np.memmap` per file and views into it, and validation is vectorised so that opening a
10-million-document index costs well under a second.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D
HEADER_BYTES = HEADER.size  # 34
# Megatron-LM's DType enum; the codes are part of the file format.
DTYPE_CODES = {
    1: np.dtype("<u1"), 2: np.dtype("<i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"),
    5: np.dtype("<i8"), 6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2"),
}
CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


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


def dtype_code(dtype) -> tuple[np.dtype, int]:
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype not in CODE_OF:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset (supported: {names})")
    return dtype, CODE_OF[dtype]

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
        self._index = index  # kept for fingerprint(): the bytes validated here, not whatever the path holds later
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
        The bytes hashed are those of the index opened (and read) here, not the file now at the path:
        a dataset rewritten since must not lend its id to this one's sizes (the index cache key).
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for start in range(0, len(self._index), 1 << 22):
                digest.update(self._index[start:start + (1 << 22)])
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
    _, version, code, n, d = HEADER.unpack(head)
    if version != VERSION:
        raise IndexFormatError(f"{path}: unsupported version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise IndexFormatError(f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
    expected, actual = HEADER_BYTES + 12 * n + 8 * d, os.path.getsize(path)
    if actual < expected:
        raise IndexFormatError(f"{path}: truncated index: header says {n} sequences and {d} document "
                               f"indices ({expected} bytes) but the file has {actual} bytes")
    if actual > expected:
        modes = (f" ({n} bytes more, one per sequence: Megatron-LM's multimodal sequence modes, which megamath "
                 "does not read)") if n and actual == expected + n else ""
        raise IndexFormatError(f"{path}: index longer than it should be: header says {n} sequences and "
                               f"{d} document indices ({expected} bytes) but the file has {actual} bytes{modes}")
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
