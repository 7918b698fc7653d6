"""The test side of the overlap check: test items, their word n-grams, and the key table the scan uses.

Words and n-grams follow the reference tool's rule (see the package docstring): `text.split()`, n
consecutive words, exact comparison. An n-gram is held as its words joined by one space, which is the
reference's representation, so a matched n-gram can be printed and compared as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from megamath import _helpers
from megamath.jsonl import read_jsonl_objects


def words(text: str) -> list[str]:
    """The words of a text: Python's `str.split()` with no argument, nothing else normalised."""
    return text.split()


def ngrams(text: str, n: int) -> list[str]:
    """The word n-grams of `text` in order (repeats kept), each as its words joined by one space."""
    w = words(text)
    return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]


def encode_texts(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """UTF-8 of the texts back to back, and (len(texts) + 1,) int64 byte offsets of each.

    Lone surrogates (which JSON's `\\ud800` escapes can produce) pass through as their 3-byte form: they
    are not whitespace, so they stay inside a word, as in `str.split()`.
    """
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


@dataclass(frozen=True)
class TestItem:
    """One record of the test file."""

    id: str | int
    """The record's id field when it has one (by default `id`, else `unique_id`, as `megamath eval` names
    MATH problems), else its 0-based position among the file's records (the reference tool's id: the index
    in the dataset)."""
    texts: tuple[str, ...]
    """The value of each `--field`, in the order given."""


def load_test_items(path: str | Path, fields: Sequence[str], id_field: str = "id") -> list[TestItem]:
    """Read a jsonl test file; every record must be an object with a string for each field."""
    path = Path(path)
    if not fields:
        raise ValueError("no --field given: name the test field(s) to check, e.g. --field question")
    # The default also takes MATH-500's `unique_id`, as `megamath eval` does: the two must name a problem alike
    # for `megamath overlap-accuracy` to join them.
    id_fields = (id_field, "unique_id") if id_field == "id" else (id_field,)
    items: list[TestItem] = []
    with_id = set()
    for line_no, record in read_jsonl_objects(path, "test file"):
        texts = []
        for name in fields:
            if name not in record:
                keys = ", ".join(repr(k) for k in list(record)[:8])
                raise ValueError(f"{path}:{line_no}: no field {name!r} (keys: {keys})")
            if not isinstance(record[name], str):
                raise ValueError(f"{path}:{line_no}: field {name!r} is not a string")
            texts.append(record[name])
        name = next((n for n in id_fields if n in record), None)
        item_id = record[name] if name else len(items)
        if name:
            with_id.add(len(items))
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise ValueError(f"{path}:{line_no}: id field {name!r} must be a string or an integer")
        items.append(TestItem(item_id, tuple(texts)))
    if not items:
        raise ValueError(f"{path}: no test records")
    if id_field != "id" and not with_id:  # a field named on purpose: a typo must not fall back to positions
        raise ValueError(f"{path}: no record has the --id-field {id_field!r}")
    if with_id and len(with_id) != len(items):
        missing = next(i for i in range(len(items)) if i not in with_id)
        raise ValueError(f"{path}: record {missing} has no {' or '.join(map(repr, id_fields))} field while others "
                         "have one")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: the {id_field!r} values are not unique")
    return items


@dataclass
class TestIndex:
    """Every n-gram of every test item, for each n: the exact strings (to verify candidates) and the
    64-bit keys (the C++ scan's table)."""

    items: list[TestItem]
    fields: tuple[str, ...]
    ns: tuple[int, ...]
    by_n: list[dict[str, list[tuple[int, int]]]] = field(default_factory=list)
    """by_n[j][ngram] -> [(item index, field index), ...] for n = ns[j], in item then field order."""
    table: np.ndarray = field(default_factory=lambda: np.zeros(16, dtype=np.uint64))
    """(power of two,) uint64 open-addressing set of all test n-gram keys (`_helpers.build_key_table`)."""
    without_ngrams: dict[tuple[int, int], int] = field(default_factory=dict)
    """(field index, j) -> test items whose field has fewer than ns[j] words (they can never hit)."""

    @classmethod
    def build(cls, items: list[TestItem], fields: Sequence[str], ns: Sequence[int]) -> "TestIndex":
        ns = tuple(sorted(set(int(n) for n in ns)))
        if not ns or ns[0] < 1:
            raise ValueError(f"--n must be at least 1, got {min(ns) if ns else 'nothing'}")
        index = cls(items, tuple(fields), ns)
        index.by_n = [{} for _ in ns]
        texts = [text for item in items for text in item.texts]  # item-major, field-minor
        for j, n in enumerate(ns):
            for t, text in enumerate(texts):
                grams = ngrams(text, n)
                if not grams:
                    key = (t % len(fields), j)
                    index.without_ngrams[key] = index.without_ngrams.get(key, 0) + 1
                for gram in dict.fromkeys(grams):  # distinct, in order
                    index.by_n[j].setdefault(gram, []).append((t // len(fields), t % len(fields)))
        data, offsets = encode_texts(texts)
        keys, which, _, _, _ = _helpers.ngram_keys(data, offsets, np.asarray(ns, dtype=np.int64))
        expected = sum(max(len(words(text)) - n + 1, 0) for n in ns for text in texts)
        if len(keys) != expected:  # the C++ word split must be str.split(): a mismatch would lose hits
            raise RuntimeError(f"C++ word split disagrees with str.split(): {len(keys)} n-grams, expected {expected}")
        index.table = _helpers.build_key_table(np.unique(keys))
        return index

    def match(self, j: int, ngram: str) -> list[tuple[int, int]]:
        """(item, field) pairs holding `ngram` (an n-gram of length ns[j]); empty for a collision."""
        return self.by_n[j].get(ngram, [])
