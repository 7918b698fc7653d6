"""`megamath overlap`: planted overlaps are found at the right n and place, near misses are not, and the
fast scan equals the reference tool's plain-Python algorithm (including when every n-gram collides)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard

from megamath import _helpers
from megamath.cli import main
from megamath.overlap import overlap_ref
from megamath.overlap.ngrams import TestIndex as OverlapIndex, TestItem as OverlapItem, encode_texts, load_test_items
from megamath.overlap.run import OverlapConfig, overlap, summary_path, verify
from megamath.overlap.scan import ScanSpec, scan_batch

WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]  # Python's 29 whitespace characters


def _words(rng: random.Random, count: int, prefix: str) -> list[str]:
    """Words no other call shares (so nothing overlaps by accident)."""
    return [f"{prefix}{i}x{rng.randrange(10**6)}" for i in range(count)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def _read_hits(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_word_split_is_str_split():
    """The C++ split (UTF-8 bytes) must cut exactly where str.split() does, or hits would be lost."""
    rng = random.Random(0)
    alphabet = list("ab é∑\u200b\ufeff\U0001F600") + WHITESPACE
    texts = ["".join(WHITESPACE), "a" + "b".join(WHITESPACE) + "c"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    for text in texts:
        data = text.encode()
        assert [data[s:e].decode() for s, e in _helpers.word_spans(data)] == text.split(), repr(text)


@pytest.fixture
def planted(tmp_path):
    """A test set and a two-subset corpus with overlaps planted at known lines and character offsets."""
    rng = random.Random(1)
    q = [_words(rng, 50, f"q{i}w") for i in range(8)]
    questions = [" ".join(w) for w in q]
    questions[6] = " ".join(["∫", "αβγ", "日本語", "e\u0301", "😀"] + q[6][5:])  # Unicode words
    q[6] = questions[6].split()
    questions[7] = " ".join(q[7][:12])  # shorter than both n: can never hit
    _write_jsonl(tmp_path / "test.jsonl", [{"question": s, "answer": "42"} for s in questions])
    filler = lambda tag: " ".join(_words(rng, 40, tag))  # noqa: E731
    near_miss = [w if i % 20 != 10 else "CHANGED" for i, w in enumerate(q[4])]  # one change in every 20-window
    seps = ["\n", "\t", "   ", "\u00a0", "\u3000", "\r\n", " \n\n "]
    docs = {
        "whole": filler("a") + " " + questions[0] + "\n" + filler("b"),
        "part30": filler("c") + " " + " ".join(q[1][10:40]) + " . " + filler("d"),  # 30 words of q1
        "part25": " ".join(q[2][5:30]),  # 25 words of q2: a 20-gram hit, no 30-gram
        "whitespace": filler("e") + "\n\n" + "".join(w + seps[i % len(seps)] for i, w in enumerate(q[3])),
        "near_miss": " ".join(near_miss),
        "short": " ".join(q[5][:10]),  # shorter than n
        "blank": " \n\t ",
        "unicode": "前文 ∑ " + filler("f") + " " + questions[6] + " 后文",
    }
    web = [{"text": docs[k], "meta": {"name": k}} for k in ("whole", "part30", "part25", "whitespace")]
    arxiv = [{"text": docs[k], "meta": {"name": k}} for k in ("near_miss", "short", "blank", "unicode")]
    _write_jsonl(tmp_path / "corpus/open-web-math/train/owm-0000.jsonl.zst", web)
    _write_jsonl(tmp_path / "corpus/arxiv/test/arxiv-0000.jsonl", arxiv)
    return tmp_path, questions, docs


def test_planted_overlaps_found_at_the_right_n_and_place(planted):
    tmp, questions, docs = planted
    out = tmp / "hits.jsonl"
    summary = overlap(OverlapConfig(tmp / "test.jsonl", ["question"], [tmp / "corpus"], out, ns=[20, 30],
                                    progress=False))
    hits = _read_hits(out)
    got = sorted((h["test_id"], h["n"], h["meta"]["name"]) for h in hits)
    expected = sorted([(0, 20, "whole"), (0, 30, "whole"), (1, 20, "part30"), (1, 30, "part30"),
                       (2, 20, "part25"), (3, 20, "whitespace"), (3, 30, "whitespace"),
                       (6, 20, "unicode"), (6, 30, "unicode")])
    assert got == expected  # no near miss, no short or blank document, nothing for the 12-word question
    lines = {"whole": 1, "part30": 2, "part25": 3, "whitespace": 4, "unicode": 4}
    for h in hits:
        name = h["meta"]["name"]
        text = docs[name]
        words = h["ngram"].split()
        assert len(words) == h["n"]
        assert text[h["offset"]:].split()[:h["n"]] == words  # the offset points at the n-gram in the text
        assert " ".join(questions[h["test_id"]].split()).find(h["ngram"]) >= 0
        assert h["line"] == lines[name] and h["field"] == "question"
        assert h["subset"] == ("open-web-math" if name != "unicode" else "arxiv")
        assert h["split"] == ("train" if name != "unicode" else "test")
        assert h["file"].endswith(".jsonl.zst" if name != "unicode" else ".jsonl")
        # distinct shared n-grams: a whole 50-word question has 50 - n + 1
        if name in ("whole", "whitespace", "unicode"):
            assert h["matching_ngrams"] == 50 - h["n"] + 1
    first = next(h for h in hits if h["meta"]["name"] == "whole" and h["n"] == 30)
    assert first["offset"] == len(docs["whole"].split(questions[0])[0]) and first["ngram"] == " ".join(questions[0].split()[:30])
    part = next(h for h in hits if h["meta"]["name"] == "part30" and h["n"] == 30)
    assert part["matching_ngrams"] == 1
    # the summary, printed and beside the output
    data = json.loads(summary_path(out).read_text())
    totals = {t["n"]: t for t in data["totals"]}
    assert totals[30]["items_hit"] == 4 and totals[30]["documents_hit"] == 4
    assert totals[20]["items_hit"] == 5 and totals[30]["items_without_ngrams"] == 1
    per_subset = {(s["subset"], s["n"]): s for s in data["subsets"]}
    assert per_subset[("arxiv", 30)]["items_hit"] == 1 and per_subset[("arxiv", 30)]["documents"] == 4
    assert "4 of 8 test items hit by 4 documents" in summary.format()


def test_identical_output_for_one_and_two_workers(planted, tmp_path):
    tmp, questions, docs = planted
    rng = random.Random(2)
    # more files and many small batches, so that the two workers really interleave
    for f in range(3):
        records = [{"text": " ".join(rng.choice(questions).split()[rng.randrange(20):]) + f" doc{f}-{i}", "meta": i}
                   for i in range(40)]
        _write_jsonl(tmp / f"corpus/algebraic-stack/train/as-{f:04d}.jsonl.zst", records)
    outputs = []
    for workers in (1, 2):
        out = tmp / f"hits-{workers}.jsonl"
        overlap(OverlapConfig(tmp / "test.jsonl", ["question", "answer"], [tmp / "corpus"], out, ns=[20, 30],
                              workers=workers, batch_bytes=2048, progress=False))
        data = json.loads(summary_path(out).read_text())
        data.pop("seconds"), data.pop("mb_per_s")
        outputs.append((out.read_bytes(), data))
    assert outputs[0] == outputs[1]
    assert outputs[0][0].count(b"\n") > 50


def _random_corpus(rng: random.Random, vocab: list[str], docs: int) -> list[str]:
    seps = [" ", " ", " ", "\n", "\t", "  ", "\u00a0", "\u2003", "\r\n"]
    out = []
    for _ in range(docs):
        length = rng.randint(0, 30)
        out.append(rng.choice(["", " ", "\n"]) + "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(length)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hits_equal_the_plain_python_reference_on_random_corpora(tmp_path, seed):
    """A small vocabulary makes short n-grams repeat a lot: many hits, many documents per item."""
    rng = random.Random(seed)
    vocab = ["a", "b", "c", "αβ", "日本", "x.y", "$1$", "😀"][: rng.randint(3, 5)]
    tests = [(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))), rng.choice(vocab) * 2)
             for _ in range(20)]
    corpus = _random_corpus(rng, vocab, 150)
    ns = sorted(rng.sample([2, 3, 4, 5], 2))
    _write_jsonl(tmp_path / "test.jsonl", [{"question": q, "answer": a, "id": f"t{i}"} for i, (q, a) in enumerate(tests)])
    _write_jsonl(tmp_path / "corpus.jsonl.gz", [])  # an empty file on the way
    _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t if t else "-"} for t in corpus])
    out = tmp_path / "hits.jsonl"
    overlap(OverlapConfig(tmp_path / "test.jsonl", ["question", "answer"], [tmp_path / "corpus.jsonl"], out, ns=ns,
                          batch_bytes=500, progress=False))
    ref = overlap_ref(tests, [t if t else "-" for t in corpus], ns)
    assert len(ref) > 50
    hits = _read_hits(out)
    assert [(h["line"] - 1, int(h["test_id"][1:]), ["question", "answer"].index(h["field"]), h["n"]) for h in hits] \
        == [r[:4] for r in ref]
    for h, r in zip(hits, ref):
        assert h["matching_ngrams"] == len(r[4]) and h["ngram"] in r[4]


def test_collisions_never_become_hits(tmp_path):
    """With a key table holding every corpus n-gram, every window is a candidate; verification must
    still leave exactly the reference's hits."""
    rng = random.Random(3)
    vocab = ["p", "q", "r", "s"]
    tests = [(" ".join(rng.choice(vocab) for _ in range(8)),) for _ in range(5)]
    corpus = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 25))) for _ in range(60)]
    items = [OverlapItem(i, t) for i, t in enumerate(tests)]
    index = OverlapIndex.build(items, ["question"], [4])
    data, offsets = encode_texts(corpus)
    every_key = _helpers.ngram_keys(data, offsets, np.array([4], dtype=np.int64))[0]
    spec = ScanSpec("text", np.array([4], dtype=np.int64), _helpers.build_key_table(np.unique(every_key)))
    batch = "".join(json.dumps({"text": t}) + "\n" for t in corpus).encode()
    result = scan_batch(spec, batch)
    assert len(result.candidates) == sum(max(len(t.split()) - 3, 0) for t in corpus)
    hits = verify(index, result)
    assert [(line, item, fld, 4) for line, item, fld, j in hits] == [r[:4] for r in overlap_ref(tests, corpus, [4])]


def test_test_file_errors(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", [{"question": "a b"}, {"problem": "c"}])
    with pytest.raises(ValueError, match=r"t.jsonl:2: no field 'question'"):
        load_test_items(tmp_path / "t.jsonl", ["question"])
    _write_jsonl(tmp_path / "ids.jsonl", [{"question": "a", "id": 1}, {"question": "b", "id": 1}])
    with pytest.raises(ValueError, match="not unique"):
        load_test_items(tmp_path / "ids.jsonl", ["question"])
    # a named id field that no record has (a typo) used to fall back to positions, which join other results
    _write_jsonl(tmp_path / "uid.jsonl", [{"question": "a", "unique_id": "x/1"}, {"question": "b", "unique_id": "x/2"}])
    with pytest.raises(ValueError, match=r"uid.jsonl: no record has the --id-field 'uniqe_id'$"):
        load_test_items(tmp_path / "uid.jsonl", ["question"], "uniqe_id")
    assert [item.id for item in load_test_items(tmp_path / "uid.jsonl", ["question"], "unique_id")] == ["x/1", "x/2"]
    _write_jsonl(tmp_path / "c/x.jsonl", [{"text": "a b"}])
    assert main(["overlap", "--test", str(tmp_path / "t.jsonl"), "--field", "question", "--corpus",
                 str(tmp_path / "c"), "--output", str(tmp_path / "h.jsonl"), "--no-progress"]) == 2
    assert main(["overlap", "--test", str(tmp_path / "missing.jsonl"), "--field", "question", "--corpus",
                 str(tmp_path / "c"), "--output", str(tmp_path / "h.jsonl"), "--no-progress"]) == 2
    assert not (tmp_path / "h.jsonl").exists()


def test_cli_end_to_end(planted, capsys):
    tmp, _, _ = planted
    out = tmp / "cli-hits.jsonl"
    assert main(["overlap", "--test", str(tmp / "test.jsonl"), "--field", "question", "--field", "answer",
                 "--corpus", str(tmp / "corpus/open-web-math"), str(tmp / "corpus/arxiv/test/arxiv-0000.jsonl"),
                 "--n", "30", "--workers", "1", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "question n=30: 4 of 8 test items hit by 4 documents" in printed
    assert "answer n=30: 0 of 8" in printed and summary_path(out).is_file()


def _slow_first_files(spec, path, group):
    """Early files take longest, so later files finish first and must be held back."""
    import time
    time.sleep(0.05 * (spec - group))
    for k in range(3):
        yield (group, k)


def test_file_pool_keeps_file_order_and_reports_bad_input(tmp_path):
    from megamath.overlap.pool import map_files

    files = [(tmp_path / f"f{i}", i) for i in range(6)]
    assert list(map_files(_slow_first_files, 6, files, 3)) == [(g, k) for g in range(6) for k in range(3)]
    (tmp_path / "c").mkdir()
    _write_jsonl(tmp_path / "c/a.jsonl", [{"text": "a b c"}])
    (tmp_path / "c/b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 100)[:-5])
    _write_jsonl(tmp_path / "t.jsonl", [{"question": "a b c"}])
    for workers in (1, 2):
        with pytest.raises(ValueError, match="b.jsonl.zst: cannot decompress"):
            overlap(OverlapConfig(tmp_path / "t.jsonl", ["question"], [tmp_path / "c"], tmp_path / "h.jsonl", ns=[2],
                                  workers=workers, progress=False))
        assert not (tmp_path / "h.jsonl").exists()


def test_bad_lines_are_skipped_and_counted_without_losing_hits(tmp_path):
    """A batch with a bad line leaves the C++ fast path for Python's parser: the good lines around it
    still hit, at their own line numbers."""
    question = " ".join(f"w{i}" for i in range(12))
    _write_jsonl(tmp_path / "t.jsonl", [{"question": question}])
    lines = [json.dumps({"text": "intro " + question, "meta": 1}), "{not json", json.dumps({"text": ""}),
             json.dumps({"meta": 2}), json.dumps({"text": question + " outro", "meta": 3})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "h.jsonl"
    summary = overlap(OverlapConfig(tmp_path / "t.jsonl", ["question"], [tmp_path / "c.jsonl"], out, ns=[10],
                                    progress=False))
    assert [(h["line"], h["meta"], h["offset"]) for h in _read_hits(out)] == [(1, 1, 6), (5, 3, 0)]
    assert summary.skipped == {"invalid JSON": 1, "empty text": 1, "missing json key": 1}
    assert summary.documents == 2


def test_numpy_scan_nominates_the_same_spans_as_the_cpp_scan():
    """The measured alternative (numpy) must cut words and n-grams exactly as the C++ scan does."""
    from megamath.overlap.numpy_scan import NumpyScanner

    rng = random.Random(4)
    vocab = ["a", "bb", "αβ", "日本語", "😀", "x\u200by"]
    corpus = _random_corpus(rng, vocab, 80) + ["", "one", "a" + "b".join(WHITESPACE) + "c"]
    data, offsets = encode_texts(corpus)
    ns = np.array([1, 3, 5], dtype=np.int64)
    ours, theirs = _helpers.ngram_keys(data, offsets, ns), NumpyScanner().scan(data, offsets, ns)
    assert len(ours[0]) > 500
    for a, b in zip(ours[1:], theirs[1:]):  # which n, document, start, end (the keys differ by design)
        np.testing.assert_array_equal(a, b)
    scanner = NumpyScanner()
    test_data, test_offsets = encode_texts([" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(5)])
    table = _helpers.build_key_table(np.unique(_helpers.ngram_keys(test_data, test_offsets, ns)[0]))
    keys = scanner.keys_of(test_data, test_offsets, ns)
    for a, b in zip(_helpers.scan_candidates(data, offsets, ns, table), scanner.scan(data, offsets, ns, keys)):
        np.testing.assert_array_equal(a, b)


def test_a_field_given_twice_is_checked_once(planted, capsys):
    """`--field question --field question` (as --n 30 --n 30 already was) counts once: it wrote every hit line
    twice and doubled the summary's rows."""
    tmp, _, _ = planted
    corpus = ["--corpus", str(tmp / "corpus/open-web-math"), "--n", "30", "--workers", "1", "--no-progress"]
    once, twice = tmp / "once.jsonl", tmp / "twice.jsonl"
    assert main(["overlap", "--test", str(tmp / "test.jsonl"), "--field", "question", "--output", str(once),
                 *corpus]) == 0
    assert main(["overlap", "--test", str(tmp / "test.jsonl"), "--field", "question", "--field", "question",
                 "--output", str(twice), *corpus]) == 0
    totals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("question n=30:")]
    assert len(totals) == 2  # one total line per run
    assert _read_hits(twice) == _read_hits(once) and _read_hits(once)
    assert json.loads(summary_path(twice).read_text())["fields"] == ["question"]


def test_candidate_offsets_cost_linear_time_in_a_long_document():
    """A document holding a test text many times (a benchmark dump) makes many candidates: each one's
    character offset was found by decoding the document up to it, quadratic in the document's length
    (100,000 candidates in 300 kB took ~20 s; a 10 MB dump took hours). The scan's CPU time is bounded, not its
    wall time: it takes ~0.5 s of CPU, and on a loaded 2-core machine the wall clock, which also counts the
    time the process waits for a CPU, passed 5 s."""
    import time

    index = OverlapIndex.build([OverlapItem(0, ("é",))], ["question"], [1])
    spec = ScanSpec("text", np.array([1], dtype=np.int64), index.table)
    batch = (json.dumps({"text": "é " * 100_000, "meta": 0}, ensure_ascii=False) + "\n").encode()
    start = time.process_time()
    result = scan_batch(spec, batch)
    assert time.process_time() - start < 5.0
    assert [c.offset for c in result.candidates] == list(range(0, 200_000, 2))
    hits = verify(index, result)
    assert [(key, hit.offset, hit.ngram) for key, hit in hits.items()] == [((0, 0, 0, 0), 0, "é")]


def _exit_in_worker(spec, path, group):
    """A worker that dies without a word (as under the out-of-memory killer)."""
    import os
    if group == 1:
        os._exit(3)
    yield from ()


def _raise_in_worker(spec, path, group):
    raise KeyError("no such thing\nsecond line")
    yield


@pytest.mark.parametrize("fn, expected", [(_exit_in_worker, r"scan worker megamath-overlap-\d \(pid \d+\) died with "
                                                             r"exit code 3$"),
                                          (_raise_in_worker, r"a scan worker failed on \S+: KeyError: 'no such "
                                                             r"thing\\nsecond line'$")])
def test_a_worker_crash_is_one_line_and_publishes_nothing(planted, monkeypatch, capsys, fn, expected):
    """A dead or failing worker was a RuntimeError, which the CLI shows as a traceback; it is one line
    now (the worker's own traceback is kept as the error's cause, for --debug), and no hits are written."""
    import re

    from megamath.overlap import run as overlap_run
    from megamath.overlap.pool import WorkerError, map_files

    tmp, _, _ = planted
    if fn is _raise_in_worker:
        with pytest.raises(WorkerError) as err:
            list(map_files(fn, None, [(tmp / f"f{i}", i) for i in range(3)], 2))
        assert re.search(expected, str(err.value)) and "Traceback" in str(err.value.__cause__)
    monkeypatch.setattr(overlap_run, "scan_file", fn)
    out = tmp / "crash.jsonl"
    corpus = [str(tmp / "corpus/open-web-math"), str(tmp / "corpus/arxiv")]
    assert main(["overlap", "--test", str(tmp / "test.jsonl"), "--field", "question", "--corpus", *corpus,
                 "--workers", "2", "--output", str(out), "--no-progress"]) == 1  # a crash, not bad input
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megamath overlap: error: ") and re.search(expected, lines[0])
    assert not out.exists() and not summary_path(out).exists()


def test_a_subset_whose_every_line_is_skipped_is_an_error(tmp_path, capsys):
    """A wrong --json-key skips every line: the run reported '0 of N test items hit' and exited 0, which
    reads as a clean corpus. As in `megamath preprocess`, it is a one-line error and nothing is written."""
    _write_jsonl(tmp_path / "t.jsonl", [{"question": "a b c"}])
    _write_jsonl(tmp_path / "c/web/train/w.jsonl", [{"body": "a b c"}, {"body": "x y"}])
    _write_jsonl(tmp_path / "c/code/train/k.jsonl", [{"text": "a b c"}])
    out = tmp_path / "h.jsonl"
    args = ["overlap", "--test", str(tmp_path / "t.jsonl"), "--field", "question", "--corpus", str(tmp_path / "c"),
            "--n", "2", "--output", str(out), "--workers", "1", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == ("megamath overlap: error: web: every corpus line was skipped (missing json key: 2); nothing "
                     "written: check --json-key 'text' and the corpus")
    assert not out.exists() and not summary_path(out).exists()
    assert main(args + ["--json-key", "body"]) == 2  # now the other subset has no 'body'
    assert "code: every corpus line was skipped" in capsys.readouterr().err
    _write_jsonl(tmp_path / "c/web/train/w.jsonl", [{"body": "a b c"}, {"text": "a b"}])  # one good line is enough
    assert main(args) == 0 and len(_read_hits(out)) == 2
    _write_jsonl(tmp_path / "c/web/train/w.jsonl", [{"text": ""}])  # empty texts alone: nothing to scan, no fault
    assert main(args) == 0 and len(_read_hits(out)) == 1
