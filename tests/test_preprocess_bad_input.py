"""Bad input for `megamath preprocess`: every kind of bad line is skipped, counted and reported as
file:line with its reason; --strict stops at the first one in input order and publishes nothing;
corrupt archives fail with the file named; odd but valid files (BOM, CRLF, no final newline) are read."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.preprocess import PreprocessConfig, preprocess
from megamath.data.sources import (EMPTY_TEXT, INVALID_JSON, INVALID_UTF8, MISSING_KEY, NOT_A_STRING, NOT_AN_OBJECT,
                                   BadLine)


def _train(path: Path, **options) -> Path:
    sentences = (s for i in range(300) for s in (f"Theorem {i}: a + b = b + a.", f"x_{i} = \\frac{{1}}{{{i + 1}}}"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, model_type="bpe", vocab_size=320,
                                   hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, normalization_rule_name="identity", num_threads=1,
                                   minloglevel=2, **options)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Llama-like: BPE, byte fallback, unk 0 / bos 1 / eos 2, no normalization."""
    return _train(tmp_path_factory.mktemp("tok") / "bpe.model", remove_extra_whitespaces=False)


def _lines(*texts: str) -> list[bytes]:
    return [json.dumps({"text": t, "meta": {"n": i}}).encode() + b"\n" for i, t in enumerate(texts)]


def _run(inputs, model, out, **kw):
    config = PreprocessConfig(inputs=[str(p) for p in inputs], tokenizer_model=model, output_dir=out,
                              progress=False, **kw)
    return preprocess(config)


def _stored(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


BAD_LINES = [  # (line, reason, detail)
    (b'{"text": "abc"\n', INVALID_JSON, "Expecting ',' delimiter at column 15"),
    (b"\n", INVALID_JSON, "blank line"),
    (b'{"text": "caf\xe9"}\n', INVALID_UTF8, "byte 13: invalid continuation byte"),
    (b'{"text": "a\\ud800b"}\n', INVALID_UTF8, "'text' has a lone surrogate escape (\\ud800-\\udfff)"),
    (b'["text", "abc"]\n', NOT_AN_OBJECT, "the line is an array"),
    (b'"abc"\n', NOT_AN_OBJECT, "the line is a string"),
    (b'{"content": "abc", "meta": {}}\n', MISSING_KEY, "no 'text' key (keys: 'content', 'meta')"),
    (b"{}\n", MISSING_KEY, "no 'text' key (keys: none)"),
    (b'{"text": 42}\n', NOT_A_STRING, "'text' is a number"),
    (b'{"text": null}\n', NOT_A_STRING, "'text' is null"),
    (b'{"text": ["a", "b"]}\n', NOT_A_STRING, "'text' is an array"),
    (b'{"text": ""}\n', EMPTY_TEXT, "'text' is an empty string"),
    # Valid JSON that json.loads still refuses: RecursionError, and a ValueError with no .msg or .colno.
    (b'{"text": "x", "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", INVALID_JSON,
     "nested too deeply to parse (arrays or objects beyond Python's recursion limit)"),
    (b'{"text": "x", "meta": ' + b"1" * 5000 + b"}\n", INVALID_JSON,
     "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
]


@pytest.mark.parametrize("line, reason, detail", BAD_LINES, ids=[f"{r}-{d[:16]}" for _, r, d in BAD_LINES])
def test_bad_line_is_skipped_counted_and_reported(tmp_path, model, capsys, line, reason, detail):
    good = ["first document", "second\ndocument", "fourth"]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"".join(_lines(*good[:2]) + [line] + _lines(good[2])))
    (summary,) = _run([path], model, tmp_path / "out", workers=1)
    assert summary.skipped == {reason: 1}
    assert summary.bad_lines == [BadLine(path, 3, reason, detail)]
    assert str(summary.bad_lines[0]) == f"{path}:3: {reason}: {detail}"
    assert capsys.readouterr().err.splitlines() == [f"skipped {path}:3: {reason}: {detail}"]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert _stored(summary.prefix) == [sp.encode(t) + [2] for t in good]


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_stops_at_the_first_bad_line_in_input_order(tmp_path, model, workers):
    records = _lines(*[f"document number {i}" for i in range(60)])
    records[41] = b'{"text": 7}\n'  # a later batch also has a bad line; the earliest one must win
    records[52] = b"not json\n"
    root = tmp_path / "pp2"
    done = root / "arxiv" / "test" / "a.jsonl"  # a dataset that completes before the failing one
    done.parent.mkdir(parents=True)
    done.write_bytes(b"".join(_lines("fine")))
    path = root / "arxiv" / "train" / "a.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(b"".join(records)))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        _run([root], model, out, workers=workers, strict=True, batch_bytes=200)
    assert str(err.value) == f"{path}:42: {NOT_A_STRING}: 'text' is a number (strict mode stops at the first bad line)"
    assert sorted(p.name for p in out.iterdir()) == ["arxiv_test_text_document.bin", "arxiv_test_text_document.idx"]


@pytest.mark.parametrize("workers", [1, 2])
def test_json_that_json_loads_cannot_take_is_a_bad_line_not_a_crash(tmp_path, model, capsys, workers):
    """A line nested thousands deep (RecursionError) or with a 5,000-digit number (ValueError without .msg)
    aborted the run with a traceback, in a worker or in this process; now it is an invalid-JSON line."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(_lines("one") + [b'{"text": "x", "meta": ' + b"[" * 100000 + b"]" * 100000 + b"}\n"]
                              + _lines("two") + [b'{"text": "x", "meta": ' + b"9" * 5000 + b"}\n"] + _lines("three")))
    (summary,) = _run([path], model, tmp_path / "out", workers=workers)
    assert summary.skipped == {INVALID_JSON: 2} and summary.documents == 3
    assert [(b.line, b.reason) for b in summary.bad_lines] == [(2, INVALID_JSON), (4, INVALID_JSON)]
    with pytest.raises(ValueError) as err:
        _run([path], model, tmp_path / "strict", workers=workers, strict=True)
    assert str(err.value) == (f"{path}:2: {INVALID_JSON}: nested too deeply to parse (arrays or objects beyond "
                              "Python's recursion limit) (strict mode stops at the first bad line)")


def test_line_numbers_across_batches_and_files(tmp_path, model, capsys):
    first = tmp_path / "pp2" / "open-web-math" / "train" / "a-0000.jsonl.zst"
    second = first.with_name("a-0001.jsonl.zst")
    first.parent.mkdir(parents=True)
    lines = _lines(*[f"line {i}" for i in range(50)])
    for bad in (6, 29, 44):
        lines[bad] = b"[]\n"
    first.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))
    second.write_bytes(zstandard.ZstdCompressor().compress(b"".join(_lines("x", "y") + [b"{}\n"])))
    (summary,) = _run([tmp_path / "pp2"], model, tmp_path / "out", workers=2, batch_bytes=64)
    assert [(b.file, b.line) for b in summary.bad_lines] == [(first, 7), (first, 30), (first, 45), (second, 3)]
    assert summary.skipped == {NOT_AN_OBJECT: 3, MISSING_KEY: 1}
    assert summary.documents == 49


def test_all_bad_lines_counted_only_the_first_few_reported(tmp_path, model, capsys):
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"".join(_lines("ok") + [b'{"text": ""}\n'] * 7 + [b"{oops\n"] * 2))
    (summary,) = _run([path], model, tmp_path / "out", workers=1, report_bad_lines=2)
    assert summary.skipped == {EMPTY_TEXT: 7, INVALID_JSON: 2}
    assert [(b.line, b.reason) for b in summary.bad_lines] == [(2, EMPTY_TEXT), (3, EMPTY_TEXT),
                                                                (9, INVALID_JSON), (10, INVALID_JSON)]
    assert len(capsys.readouterr().err.splitlines()) == 4
    assert summary.documents == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dataset_whose_every_line_is_skipped_is_an_error_not_an_empty_dataset(tmp_path, model, workers):
    """A wrong --json-key skips every line: publishing an empty dataset and exiting 0 hid the mistake."""
    root = tmp_path / "pp2"
    for split, key in (("test", "text"), ("train", "content")):
        path = root / "arxiv" / split / "a.jsonl"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"".join(json.dumps({key: f"document {i}"}).encode() + b"\n" for i in range(3)))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        _run([root], model, out, workers=workers)
    assert str(err.value) == (f"arxiv_train_text_document: every line was skipped ({MISSING_KEY}: 3; first: "
                              f"{root}/arxiv/train/a.jsonl:1: {MISSING_KEY}: no 'text' key (keys: 'content')); "
                              "nothing written for it: check --json-key and the input")
    assert sorted(p.name for p in out.iterdir()) == ["arxiv_test_text_document.bin", "arxiv_test_text_document.idx"]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    (summary,) = _run([empty], model, tmp_path / "out2", workers=workers)  # no lines at all: an empty dataset
    assert (summary.documents, summary.skipped) == (0, {})


def test_text_that_encodes_to_no_tokens_is_skipped(tmp_path):
    # remove_extra_whitespaces: a text of spaces normalizes to nothing.
    squeezing = _train(tmp_path / "squeeze.model", remove_extra_whitespaces=True)
    assert spm.SentencePieceProcessor(model_file=str(squeezing)).encode("   ") == []
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(_lines("a b", "   ", "c", "  ")))
    for append_eod in (True, False):
        (summary,) = _run([path], squeezing, tmp_path / f"out{append_eod}", workers=1, append_eod=append_eod)
        assert [(b.line, b.reason, b.detail) for b in summary.bad_lines] == [
            (2, EMPTY_TEXT, "'text' encodes to no tokens"), (4, EMPTY_TEXT, "'text' encodes to no tokens")]
        sp = spm.SentencePieceProcessor(model_file=str(squeezing))
        assert _stored(summary.prefix) == [sp.encode(t) + [2] * append_eod for t in ("a b", "c")]


@pytest.mark.parametrize("name, corrupt, message", [
    ("cut.jsonl.zst", lambda data: zstandard.ZstdCompressor().compress(data)[:-9],
     "the file ends inside a zstd frame (truncated?)"),
    ("junk.jsonl.zst", lambda data: b"definitely not zstd" * 4, "zstd decompressor error: Unknown frame descriptor"),
    ("cut.jsonl.gz", lambda data: gzip.compress(data)[:-20],
     "Compressed file ended before the end-of-stream marker was reached"),
])
def test_corrupt_archives_fail_with_the_file_named(tmp_path, model, name, corrupt, message):
    path = tmp_path / name
    path.write_bytes(corrupt(b"".join(_lines(*[f"document {i}" for i in range(300)]))))
    with pytest.raises(ValueError) as err:
        _run([path], model, tmp_path / "out", workers=1)
    assert str(err.value).startswith(f"{path}: cannot decompress near line ")
    assert str(err.value).endswith(f": {message}")
    assert list((tmp_path / "out").iterdir()) == []


def test_datasets_finished_before_a_failure_stay_and_are_named(tmp_path, model, capsys):
    """A late failure keeps the datasets already published (hours of work on a large corpus) and says which:
    the folder otherwise held them, new, beside the failed one's old files with nothing to tell them apart."""
    good, cut = tmp_path / "a.jsonl", tmp_path / "b.jsonl.zst"
    good.write_bytes(b"".join(_lines("one", "two")))
    # cut in its last block: the blocks before it decode, so b's dataset is begun (and a's finished) first
    cut.write_bytes(zstandard.ZstdCompressor().compress(b"".join(_lines(*[f"d {i}" for i in range(30000)])))[:-9])
    with pytest.raises(ValueError, match=r"b\.jsonl\.zst: cannot decompress"):
        _run([good, cut], model, tmp_path / "out", workers=1, batch_bytes=4096)
    assert "finished before the failure, and published: a_text_document" in capsys.readouterr().err
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert _stored(tmp_path / "out" / "a_text_document") == [sp.encode(t) + [2] for t in ("one", "two")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_text_document.bin", "a_text_document.idx"]


def test_valid_but_unusual_files(tmp_path, model):
    """UTF-8 BOM, CRLF line ends, no final newline, meta as a JSON string, another json key."""
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"content": "one", "meta": "{\\"a\\": 1}"}\r\n'
                     + b'{"content": "two\\r\\nlines", "meta": {}}\r\n' + b'{"content": "three"}')
    (summary,) = _run([path], model, tmp_path / "out", workers=1, json_key="content")
    assert summary.name == "odd_content_document" and summary.skipped == {}
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert _stored(tmp_path / "out" / "odd_content_document") == [
        sp.encode(t) + [2] for t in ("one", "two\r\nlines", "three")]


def test_config_validation(tmp_path, model):
    for kw, message in [({"workers": 0}, "--workers must be at least 1, got 0"),
                        ({"json_key": ""}, "--json-key must not be empty"),
                        ({"batch_bytes": 0}, "batch_bytes must be at least 1, got 0")]:
        with pytest.raises(ValueError) as err:
            PreprocessConfig(inputs=["x.jsonl"], tokenizer_model=model, output_dir=tmp_path, **kw)
        assert str(err.value) == message
