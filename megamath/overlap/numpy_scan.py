"""The n-gram scan vectorised in numpy: the alternative to the C++ scan, kept to measure the two.

Same words (`str.split()`'s whitespace, found with byte masks), same candidate spans, different keys:
prefix sums of polynomial hashes (mod 2^64, numpy's wrapping uint64 arithmetic) give every word's hash
and then every n-gram's, each in a few whole-array passes. `perf/bench_overlap.py` times it against
`_helpers.scan_candidates` on the same text and checks that both nominate the same spans; the C++ scan
is used because it is faster (one pass, no temporaries of 8 bytes per byte of text).
"""
from __future__ import annotations

import numpy as np

_P, _Q = 0x100000001B3, 0x9E3779B97F4A7C15  # odd multipliers: invertible mod 2^64
_MASK = (1 << 64) - 1


def _inverse(a: int) -> int:
    """a^-1 mod 2^64 for odd a (Newton's iteration doubles the correct bits each step)."""
    x = a
    for _ in range(6):
        x = (x * (2 - a * x)) & _MASK
    return x


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class NumpyScanner:
    """Holds the power tables (grown on demand) so that each batch costs only its own passes."""

    def __init__(self) -> None:
        self._powers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        ascii_ws = np.zeros(256, dtype=bool)
        ascii_ws[list(b" \t\n\v\f\r\x1c\x1d\x1e\x1f")] = True
        self._ascii_ws = ascii_ws

    def _power_table(self, base: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(base^k, base^-k) for k < size, uint64."""
        have = self._powers.get(base)
        if have is None or len(have[0]) < size:
            size = max(size, 1 << 16, 2 * len(have[0]) if have else 0)
            pw = np.empty(size, dtype=np.uint64)
            inv = np.empty(size, dtype=np.uint64)
            pw[0] = inv[0] = 1
            pw[1:] = base
            inv[1:] = _inverse(base)
            pw, inv = np.cumprod(pw), np.cumprod(inv)  # wraps mod 2^64
            self._powers[base] = have = (pw, inv)
        return have

    def words(self, b: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) byte offsets of the words of each document, as str.split() cuts them."""
        n = len(b)
        ws = self._ascii_ws[b]
        b1 = np.zeros(n, dtype=np.uint8)
        b2 = np.zeros(n, dtype=np.uint8)
        b1[:-1], b2[:-2] = b[1:], b[2:]
        two = (b == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0))  # U+0085, U+00A0
        three = (((b == 0xE1) & (b1 == 0x9A) & (b2 == 0x80)) | ((b == 0xE3) & (b1 == 0x80) & (b2 == 0x80))
                 | ((b == 0xE2) & (((b1 == 0x80) & ((b2 <= 0x8A) | (b2 == 0xA8) | (b2 == 0xA9) | (b2 == 0xAF)))
                                   | ((b1 == 0x81) & (b2 == 0x9F)))))
        ws |= two | three
        ws[1:] |= two[:-1] | three[:-1]
        ws[2:] |= three[:-2]
        word = ~ws
        before = np.ones(n, dtype=bool)  # whitespace or a document start before byte i
        before[1:] = ws[:-1]
        after = np.ones(n, dtype=bool)
        after[:-1] = ws[1:]
        cuts = offsets[1:-1][offsets[1:-1] < n]
        before[cuts] = True
        after[cuts - 1] = True
        return np.flatnonzero(word & before), np.flatnonzero(word & after) + 1

    def scan(self, data: bytes, offsets: np.ndarray, ns: np.ndarray, keys: np.ndarray | None = None):
        """Like `_helpers.scan_candidates` with `keys` (sorted uint64 from `keys_of`) instead of a table:
        (which n, doc, start, end) of the nominated n-grams; with keys=None, (key, which n, doc, start, end)
        of all n-grams."""
        b = np.frombuffer(data, dtype=np.uint8)
        starts, ends = self.words(b, offsets)
        pw, inv = self._power_table(_P, len(b) + 1)
        with np.errstate(over="ignore"):
            prefix = np.zeros(len(b) + 1, dtype=np.uint64)
            np.cumsum(b.astype(np.uint64) * pw[:len(b)], out=prefix[1:])
            word_hash = _mix((prefix[ends] - prefix[starts]) * inv[starts])  # (words,)
            doc = np.searchsorted(offsets, starts, side="right") - 1
            qw, qinv = self._power_table(_Q, len(starts) + 1)
            g = np.zeros(len(starts) + 1, dtype=np.uint64)
            np.cumsum(word_hash * qw[:len(starts)], out=g[1:])
            out = []
            for j, n in enumerate(ns.tolist()):
                m = len(starts) - n + 1
                if m <= 0:
                    continue
                key = _mix(((g[n:] - g[:m]) * qinv[:m]) ^ np.uint64(n))
                valid = doc[n - 1:] == doc[:m]
                if keys is not None:
                    at = np.minimum(np.searchsorted(keys, key), max(len(keys) - 1, 0))
                    valid &= keys[at] == key if len(keys) else False
                i = np.flatnonzero(valid)
                out.append((key[i], np.full(len(i), j, dtype=np.int64), doc[i], starts[i], ends[i + n - 1]))
        cols = [np.concatenate(c) if out else np.zeros(0, dtype=np.int64) for c in zip(*out)] if out else \
            [np.zeros(0, dtype=np.uint64)] + [np.zeros(0, dtype=np.int64)] * 4
        order = np.lexsort((cols[3], cols[1], cols[2]))  # document, n, position: the C++ order
        cols = [c[order] for c in cols]
        return tuple(cols) if keys is None else tuple(cols[1:])

    def keys_of(self, data: bytes, offsets: np.ndarray, ns: np.ndarray) -> np.ndarray:
        """Sorted distinct keys of every n-gram of the (test) texts."""
        return np.unique(self.scan(data, offsets, ns)[0])
