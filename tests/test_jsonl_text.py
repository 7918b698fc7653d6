"""The C++ JSON-lines field extractor (the overlap scan's fast path) against Python's parse_lines: when it
says ok, its texts must be exactly json.loads(line)[key] of every line; otherwise Python parses."""
from __future__ import annotations

import json
import random

from megamath import _helpers
from megamath.data.sources import parse_lines

TRICKY = ['"', "\\", "\\u", "\\ud83d", "\\ude00", "\\u0000", "\x00", "\x1f", "\n", "\r", " ", ",", ":", "{", "}",
          "[", "]", "0", "-", "e", ".", "NaN", "\xff", "\xc3", "é", "😀", "\ufeff"]


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, -1, 12, 3.5, -2e-7, 1e300, 10**20])
    if kind == 1:
        return rng.choice([True, False, None])
    if kind in (2, 3):
        return "".join(rng.choice(["a", " ", "\n", "\t", "é", "∑", "😀", '"', "\\", "\x01", "\u2028", "$x$"])
                       for _ in range(rng.randrange(rng.choice([12, 80]))))
    if kind == 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["text", "meta", "url", "t", "é"]): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _line(rng: random.Random) -> str:
    record = {rng.choice(["meta", "url", "id"]): _value(rng) for _ in range(rng.randrange(3))}
    if rng.random() < 0.9:
        record["text"] = _value(rng) if rng.random() < 0.1 else "x" + str(_value(rng, 3))
    items = list(record.items())
    rng.shuffle(items)
    line = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.3:  # mutate: insert, delete or truncate
        i = rng.randrange(len(line) + 1)
        line = rng.choice([line[:i] + rng.choice(TRICKY) + line[i:], line[:i] + line[i + 1:], line[:i]])
    if rng.random() < 0.05:
        line = line.replace('"text"', '"t\\u0065xt"')
    return line


def _check(data: bytes, key: str = "text") -> bool:
    ok, buf, offsets = _helpers.extract_json_field(data, key)
    if ok:
        texts, bad = parse_lines(data, key)
        assert bad == [], data
        got = [buf[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
        assert got == texts, data
    return ok


def test_extractor_equals_json_loads_on_fuzzed_lines():
    rng = random.Random(0)
    ok_count = 0
    for _ in range(4000):
        line = _line(rng)
        data = line.encode("utf-8", "surrogatepass") + rng.choice([b"\n", b"", b"\r\n"])
        if rng.random() < 0.05:  # raw bytes Python's UTF-8 decoder refuses (or a cut multi-byte character)
            i = rng.randrange(len(data) + 1)
            data = data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]) + data[i:]
        ok_count += _check(data)
    assert ok_count > 1500  # the fast path does run on valid lines


def test_valid_batches_take_the_fast_path_and_bad_ones_fall_back():
    lines = [json.dumps({"text": f"doc {i} \u00e9\n😀", "meta": {"text": None, "i": [i, -0.5e-3]}}) for i in range(50)]
    assert _check(("\n".join(lines) + "\n").encode())
    assert _check(b"")
    for bad in (b"", b"[1]", b'{"text": ""}', b'{"text": 1}', b'{"meta": {}}', b'{"text": "a", "text": "b"}',
                b'{"text": "\\ud800"}', b'{"text": "a"} x', b'{"text": "a", "n": NaN}', b'{"text": "\xff"}',
                b'{"text": "a\x01"}', b'{"text": "a", "n": 01}'):
        data = ("\n".join(lines[:3]) + "\n").encode() + bad + b"\n"
        assert not _helpers.extract_json_field(data, "text")[0], bad
    assert _check(b'{"t\\u0065xt": "escaped key", "m": "\\ud800 lone surrogate outside the text"}\n')
