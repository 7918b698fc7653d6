"""Worker side of `megamath overlap`: one batch of corpus lines -> the candidate n-grams it holds.

Per batch: C++ pulls the text field of every JSON line out as UTF-8, back to back
(`_helpers.extract_json_field`; a batch with any line it is not sure of goes through Python's
`parse_lines`, shared with preprocessing, instead), then C++ (`_helpers.scan_candidates`) splits words,
rolls the n-gram hashes and looks each key up in the test keys' table. Only the few candidates come back to Python: for each, the
real n-gram (its words joined by one space, taken from the document text) and its character offset.
The main process then compares that text with the test n-grams, so a key collision never makes a hit.
The worker needs only the key table (8 bytes a slot), not the test n-gram strings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megamath import _helpers
from megamath.data.sources import parse_lines, read_line_batches
from megamath.overlap.ngrams import encode_texts


@dataclass(frozen=True)
class ScanSpec:
    """What a worker needs, small and picklable."""

    json_key: str
    ns: np.ndarray
    """(len(ns),) int64 n-gram lengths, ascending."""
    table: np.ndarray
    """uint64 key table of the test n-grams (`TestIndex.table`)."""
    batch_bytes: int = 1 << 20
    """Decompressed bytes of whole lines scanned at a time."""


@dataclass(frozen=True)
class Candidate:
    line: int
    """Line offset of the document in its batch."""
    j: int
    """Index into ns."""
    offset: int
    """Character offset of the n-gram's first word in the document text."""
    ngram: str
    """The document's n-gram: its words joined by one space."""


@dataclass
class ScanResult:
    documents: int
    text_bytes: int
    """UTF-8 bytes of the scanned texts."""
    bad: list[tuple[int, str, str]]
    """(line offset, reason, detail) of skipped lines."""
    candidates: list[Candidate] = field(default_factory=list)
    """In document order, then n, then position."""
    meta: dict[int, object] = field(default_factory=dict)
    """line offset -> the record's `meta` (None when absent), for documents with candidates."""
    file: Path | None = None
    group: int = 0
    """Index of the file's InputGroup."""
    first_line: int = 1
    """1-based line number of the batch's first line in its file."""
    file_bytes: int = 0
    """Bytes of the (compressed) file consumed for this batch: drives the progress bar."""


def scan_file(spec: ScanSpec, path: Path, group: int) -> Iterator[ScanResult]:
    """The results of a file's batches, in order (what a worker runs per task)."""
    for batch in read_line_batches(path, group, spec.batch_bytes):
        result = scan_batch(spec, batch.data)
        result.file, result.group, result.first_line, result.file_bytes = path, group, batch.first_line, batch.file_bytes
        yield result


def scan_batch(spec: ScanSpec, data: bytes) -> ScanResult:
    # Fast path: C++ pulls the text field out of every line; it gives up on the whole batch when any line
    # is not plainly valid, and then Python parses it, reporting each bad line as preprocessing does.
    ok, buf, offsets = _helpers.extract_json_field(data, spec.json_key)
    if ok:
        bad: list[tuple[int, str, str]] = []
    else:
        texts, bad = parse_lines(data, spec.json_key)
        buf, offsets = encode_texts(texts)
    documents = len(offsets) - 1
    which, docs, starts, ends = _helpers.scan_candidates(buf, offsets, spec.ns, spec.table)
    result = ScanResult(documents, len(buf), bad)
    if len(docs) == 0:
        return result
    bad_lines = {offset for offset, _, _ in bad}
    line_of = [i for i in range(documents + len(bad)) if i not in bad_lines]  # document -> line offset
    lines = data.split(b"\n")
    # One pass over the batch, not a decode of the document's prefix per candidate (quadratic in its length)
    char_offsets = _char_offsets(buf, offsets[docs], starts)
    for j, d, start, end, offset in zip(which.tolist(), docs.tolist(), starts.tolist(), ends.tolist(),
                                        char_offsets.tolist()):
        line = line_of[d]
        ngram = " ".join(buf[start:end].decode("utf-8", "surrogatepass").split())
        result.candidates.append(Candidate(line, j, offset, ngram))
        if line not in result.meta:
            record = json.loads(lines[line])
            result.meta[line] = record.get("meta")
    return result


def _char_offsets(buf: bytes, begins: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(candidates,) int64 character offset of each byte position `starts` in its document, which begins at
    byte `begins`: the bytes in between that start a UTF-8 character (not 0b10xxxxxx; a surrogatepass
    surrogate counts once, as in the str)."""
    starts_char = (np.frombuffer(buf, dtype=np.uint8) & 0xC0) != 0x80  # (bytes,)
    points = np.unique(np.concatenate([begins, starts]))  # (p,) all < len(buf)
    chars = np.zeros(len(points), dtype=np.int64)  # characters from points[0] to each point
    np.cumsum(np.add.reduceat(starts_char, points, dtype=np.int64)[:-1], out=chars[1:])
    return chars[np.searchsorted(points, starts)] - chars[np.searchsorted(points, begins)]
