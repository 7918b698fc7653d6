"""`megamath preprocess`: input discovery and naming, stored ids against SentencePiece itself, worker-count
independence, bounded read-ahead, atomic publishing on interruption, the CLI and the tokenizer's fast path."""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from megamath.cli import main
from megamath.data import preprocess as preprocess_module
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.data.preprocess import PreprocessConfig, format_summary, preprocess
from megamath.data.preprocess_workers import EncoderSpec, ProcessPool
from megamath.workers import WorkerError
from megamath.data.sources import LineBatch, discover_inputs
from megamath.data.tokenizer import SentencePieceTokenizer, encode_flat_ref, newline_cuts_are_exact, split_at_newlines

REPO = Path(__file__).resolve().parents[1]


def _training_text():
    for i in range(400):
        yield f"Lemma {i}. For all n, n + {i} = {i} + n, and (n + 1)^2 = n^2 + 2n + 1."
        yield f"def f_{i}(x):"  # one line per sentence, as Llama's tokenizer was trained: no piece holds "\n"
        yield f"    return x * {i} + 1  # ∀ ε > 0 ∃ δ"


def _train(path: Path, sentences=None, **options) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences or _training_text(), model_writer=model, vocab_size=320,
                                   hard_vocab_limit=False, unk_id=0, bos_id=1, byte_fallback=True,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, minloglevel=2, **options)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def bpe_model(tmp_path_factory) -> Path:
    """Llama-like: BPE, byte fallback, unk 0 / bos 1 / eos 2, no normalization."""
    return _train(tmp_path_factory.mktemp("tok") / "bpe.model", model_type="bpe", eos_id=2, pad_id=-1)


@pytest.fixture(scope="session")
def unigram_no_eos_model(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("tok") / "unigram.model", model_type="unigram", eos_id=-1, pad_id=-1)


def _write(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    """Write jsonl records (dicts are dumped) compressed by the path's suffix."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records) + b"".join(raw_lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["lemma", "proof", "n + 1", "∀ε>0", "x^2", "def", "return", "\\frac{a}{b}", "中文", "𝔸", "  ", "\t", "é"]
    texts = []
    for _ in range(n):
        lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(rng.integers(1, 30))]
        texts.append("\n".join(lines) + ("\n" if rng.random() < 0.5 else ""))
    return texts


def _config(inputs, model, out, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(i) for i in inputs], tokenizer_model=model, output_dir=out,
                            progress=False, **kw)


# --- discovery and naming ---------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path):
    """A ProofPile II-shaped root with two subsets, plus loose files of every format."""
    root = tmp_path / "pp2"
    for subset in ("arxiv", "open-web-math"):
        for split in ("train", "validation", "test"):
            for shard in ("b-0002", "a-0010"):
                _write(root / subset / split / f"{shard}.jsonl.zst", [{"text": f"{subset} {split} {shard}"}])
    loose = tmp_path / "loose"
    for name in ("one.jsonl", "two.jsonl.gz", "three.jsonl.zst"):
        _write(loose / name, [{"text": name}])
    (loose / "notes.txt").write_text("not an input")
    return root, loose


def _names(groups):
    return {g.name: [f.name for f in g.files] for g in groups}


def test_discover_root_subset_split_and_file(layout):
    root, _ = layout
    shards = ["a-0010.jsonl.zst", "b-0002.jsonl.zst"]  # sorted by name, not by creation order
    expected = {f"{s}_{p}": shards for s in ("arxiv", "open-web-math") for p in ("test", "train", "validation")}
    assert _names(discover_inputs([root])) == expected
    assert _names(discover_inputs([root / "arxiv"])) == {k: v for k, v in expected.items() if k.startswith("arxiv")}
    assert _names(discover_inputs([root / "arxiv" / "train"])) == {"arxiv_train": shards}
    one = discover_inputs([root / "arxiv" / "train" / "b-0002.jsonl.zst"])
    assert _names(one) == {"arxiv_train": ["b-0002.jsonl.zst"]}
    assert (one[0].subset, one[0].split) == ("arxiv", "train")
    assert one[0].output_prefix("out", "text") == Path("out") / "arxiv_train_text_document"


def test_discover_globs_loose_files_and_duplicates(layout):
    root, loose = layout
    assert _names(discover_inputs([f"{loose}/*"])) == {"one": ["one.jsonl"], "three": ["three.jsonl.zst"],
                                                       "two": ["two.jsonl.gz"]}
    groups = discover_inputs([f"{root}/*/train/a-*.jsonl.zst", loose / "two.jsonl.gz", root / "arxiv" / "train"])
    assert _names(groups) == {"arxiv_train": ["a-0010.jsonl.zst", "b-0002.jsonl.zst"],
                              "open-web-math_train": ["a-0010.jsonl.zst"], "two": ["two.jsonl.gz"]}
    assert groups[-1].subset is None and groups[-1].split is None


def test_discover_errors(tmp_path, layout):
    root, loose = layout
    with pytest.raises(FileNotFoundError, match=r"^input not found: .*missing\.jsonl$"):
        discover_inputs([tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match=r"^no \.jsonl, \.jsonl\.zst or \.jsonl\.gz files match .*\*\.json$"):
        discover_inputs([f"{loose}/*.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^no \.jsonl, \.jsonl\.zst or \.jsonl\.gz files under .*empty$"):
        discover_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported input file; expected \.jsonl, \.jsonl\.zst "
                                         r"or \.jsonl\.gz$"):
        discover_inputs([loose / "notes.txt"])
    clash = _write(tmp_path / "elsewhere" / "one.jsonl.gz", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"one\.jsonl and .*one\.jsonl\.gz would both be written to dataset 'one'; "
                                         r"rename one or preprocess them separately$"):
        discover_inputs([loose / "one.jsonl", clash])
    named_like_group = _write(tmp_path / "arxiv_train.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="would both be written to dataset 'arxiv_train'"):
        discover_inputs([root / "arxiv" / "train", named_like_group])
    with pytest.raises(ValueError, match="^no --input given$"):
        discover_inputs([])


# --- stored ids -------------------------------------------------------------------------------------


def _stored(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    assert list(ds.document_indices) == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def test_stored_ids_equal_sentencepiece(tmp_path, bpe_model):
    texts = _texts(0, 40) + ["x\n" * 3000, "no newline at all " * 400]  # long ones are cut at newlines
    path = _write(tmp_path / "in" / "docs.jsonl.zst", [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)])
    summaries = preprocess(_config([path], bpe_model, tmp_path / "out", workers=1))
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    expected = [sp.encode(t) + [2] for t in texts]
    prefix = tmp_path / "out" / "docs_text_document"
    assert _stored(prefix) == expected
    assert IndexedDataset(prefix).dtype == np.dtype("<u2")
    (s,) = summaries
    assert (s.name, s.prefix, s.files, s.documents, s.tokens) == (prefix.name, prefix, 1, 42, sum(map(len, expected)))
    assert s.input_bytes == len(zstandard.decompress(path.read_bytes()))
    assert s.output_bytes == prefix.with_suffix(".bin").stat().st_size + prefix.with_suffix(".idx").stat().st_size
    assert s.skipped == {} and s.bad_lines == []


def test_no_append_eod(tmp_path, bpe_model):
    texts = _texts(1, 10)
    path = _write(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    preprocess(_config([path], bpe_model, tmp_path / "out", workers=1, append_eod=False))
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    assert _stored(tmp_path / "out" / "d_text_document") == [sp.encode(t) for t in texts]


def test_model_without_eos(tmp_path, unigram_no_eos_model):
    path = _write(tmp_path / "d.jsonl", [{"text": t} for t in _texts(2, 5)])
    with pytest.raises(ValueError) as err:
        preprocess(_config([path], unigram_no_eos_model, tmp_path / "out", workers=1))
    assert str(err.value) == (f"{unigram_no_eos_model}: the tokenizer has no EOS token (eos_id is -1), so "
                              "--append-eod cannot mark document ends; use a model with an EOS or pass --no-append-eod")
    assert not (tmp_path / "out").exists()
    preprocess(_config([path], unigram_no_eos_model, tmp_path / "out", workers=1, append_eod=False))
    sp = spm.SentencePieceProcessor(model_file=str(unigram_no_eos_model))
    assert _stored(tmp_path / "out" / "d_text_document") == [sp.encode(t) for t in _texts(2, 5)]


def test_workers_1_and_2_write_identical_files(tmp_path, bpe_model):
    root = tmp_path / "pp2"
    _write(root / "arxiv" / "train" / "a.jsonl.zst", [{"text": t} for t in _texts(3, 30)])
    _write(root / "arxiv" / "train" / "b.jsonl.gz", [{"text": t} for t in _texts(4, 30)])
    _write(root / "arxiv" / "test" / "a.jsonl", [{"text": t} for t in _texts(5, 7)], [b"not json\n"])
    _write(root / "open-web-math" / "train" / "empty.jsonl", [])  # an empty dataset is still written
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        runs[workers] = preprocess(_config([root], bpe_model, out, workers=workers, batch_bytes=700))
    assert [s.name for s in runs[1]] == ["arxiv_test_text_document", "arxiv_train_text_document",
                                         "open-web-math_train_text_document"]
    assert [s.documents for s in runs[1]] == [7, 60, 0]
    for summary1, summary2 in zip(runs[1], runs[2]):
        assert (summary1.documents, summary1.tokens, summary1.skipped) == \
               (summary2.documents, summary2.tokens, summary2.skipped)
        for ext in (".bin", ".idx"):
            assert Path(f"{summary1.prefix}{ext}").read_bytes() == Path(f"{summary2.prefix}{ext}").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == sorted(
        f"{s.name}{ext}" for s in runs[2] for ext in (".bin", ".idx"))  # no temporaries left


def test_read_ahead_is_bounded(bpe_model):
    """At most 2 x workers batches are read before their results are consumed."""
    spec = EncoderSpec(str(bpe_model), True, "text", 2, "<u2")
    read = []

    def batches():
        for i in range(20):
            read.append(i)
            yield LineBatch(0, Path("f.jsonl"), i + 1, json.dumps({"text": f"doc {i}"}).encode() + b"\n", 10)

    pool = ProcessPool(spec, workers=2)
    try:
        for consumed, (batch, encoded) in enumerate(pool.map_ordered(batches())):
            assert batch.first_line == consumed + 1 and len(encoded.lengths) == 1
            assert len(read) - consumed <= 4
    finally:
        pool.close()
    assert len(read) == 20


def test_worker_failure_is_reported(tmp_path):
    spec = EncoderSpec(str(tmp_path / "missing.model"), True, "text", 2, "<u2")
    pool = ProcessPool(spec, workers=1)
    try:
        batch = LineBatch(0, Path("f.jsonl"), 1, b'{"text": "x"}\n', 10)
        with pytest.raises(WorkerError, match=r"^a preprocessing worker failed: FileNotFoundError: "
                                              r"tokenizer model not found: .*missing\.model$") as err:
            list(pool.map_ordered([batch]))
        assert "Traceback" in str(err.value.__cause__)  # the worker's own, shown with --debug
    finally:
        pool.close(terminate=True)


def test_dead_worker_raises_instead_of_hanging(bpe_model):
    spec = EncoderSpec(str(bpe_model), True, "text", 2, "<u2")
    pool = ProcessPool(spec, workers=1)
    try:
        pool._procs[0].kill()  # as the OOM killer would
        pool._procs[0].join()
        batch = LineBatch(0, Path("f.jsonl"), 1, b'{"text": "x"}\n', 10)
        with pytest.raises(WorkerError, match=r"^preprocessing worker megamath-preprocess-0 \(pid \d+\) died with "
                                              r"exit code -9 \(SIGKILL, e\.g\. the out-of-memory killer\)$"):
            list(pool.map_ordered([batch]))
    finally:
        pool.close(terminate=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_publishes_nothing(tmp_path, bpe_model, monkeypatch, workers):
    path = _write(tmp_path / "d.jsonl", [{"text": t} for t in _texts(6, 40)])
    out = tmp_path / "out"
    preprocess(_config([_write(tmp_path / "other.jsonl", [{"text": "kept"}])], bpe_model, out, workers=1))
    calls = []
    original = IndexedDatasetWriter.add_documents

    def interrupted(self, tokens, lengths, sequences=None):
        calls.append(len(lengths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, tokens, lengths, sequences)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(_config([path], bpe_model, out, workers=workers, batch_bytes=500))
    assert len(calls) == 3
    assert sorted(p.name for p in out.iterdir()) == ["other_text_document.bin", "other_text_document.idx"]


def test_published_dataset_replaced_only_on_success(tmp_path, bpe_model, monkeypatch):
    path = _write(tmp_path / "d.jsonl", [{"text": "first version"}])
    out = tmp_path / "out"
    preprocess(_config([path], bpe_model, out, workers=1))
    before = _stored(out / "d_text_document")
    _write(path, [{"text": t} for t in _texts(7, 20)])
    monkeypatch.setattr(preprocess_module.IndexedDatasetWriter, "finalize",
                        lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        preprocess(_config([path], bpe_model, out, workers=1))
    assert _stored(out / "d_text_document") == before
    assert sorted(p.name for p in out.iterdir()) == ["d_text_document.bin", "d_text_document.idx"]


# --- tokenizer fast path ----------------------------------------------------------------------------


def test_split_at_newlines():
    text = "ab\ncd\n\nefgh\nij"
    assert split_at_newlines(text, 0) == ["ab\n", "cd\n", "\n", "efgh\n", "ij"]
    assert split_at_newlines(text, 4) == ["ab\ncd\n", "\nefgh\n", "ij"]
    assert split_at_newlines(text, 100) == [text]
    assert split_at_newlines("abc\n", 0) == ["abc\n"]  # never an empty last part
    for size in range(8):
        assert "".join(split_at_newlines(text, size)) == text


def test_newline_cuts_exact_only_where_proven(tmp_path, bpe_model, unigram_no_eos_model):
    assert newline_cuts_are_exact(spm.SentencePieceProcessor(model_file=str(bpe_model)))
    assert not newline_cuts_are_exact(spm.SentencePieceProcessor(model_file=str(unigram_no_eos_model)))
    assert SentencePieceTokenizer(unigram_no_eos_model).eos_id is None
    # Trained on multi-line sentences, BPE learns pieces holding "\n": cuts there would change the ids.
    with_newlines = _train(tmp_path / "nl.model", (f"x = {i}\n\ny = {i}\n" for i in range(300)), model_type="bpe")
    tokenizer = SentencePieceTokenizer(with_newlines, segment_chars=0)
    assert any("\n" in p for p in tokenizer.sp.id_to_piece(list(range(tokenizer.vocab_size))))
    assert not tokenizer.newline_cuts
    texts = [f"x = {i}\n\ny = {i}\n" * 3 for i in range(5)]
    np.testing.assert_array_equal(tokenizer.encode_flat(texts)[0], encode_flat_ref(tokenizer.sp, texts)[0])


@pytest.mark.parametrize("segment_chars", [0, 5, 64, 10_000])
def test_encode_flat_equals_reference(bpe_model, segment_chars):
    tokenizer = SentencePieceTokenizer(bpe_model, segment_chars=segment_chars)
    assert tokenizer.newline_cuts
    texts = _texts(8, 30) + ["\n\n\n", " \n \n ", "a\n", "\nb", "é\n\u0301", "x" * 50]
    for append_id in (None, 2):
        got = tokenizer.encode_flat(texts, append_id, np.uint16)
        ref = encode_flat_ref(tokenizer.sp, texts, append_id, np.uint16)
        assert got[0].dtype == np.uint16 and got[1].dtype == np.int64
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^tokenizer model not found: .*nope\.model$"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"\x00not a model")
    with pytest.raises(ValueError, match=r"bad\.model: not a SentencePiece model \("):
        SentencePieceTokenizer(tmp_path / "bad.model")


# --- command line -----------------------------------------------------------------------------------


def test_cli(tmp_path, bpe_model, capsys):
    path = _write(tmp_path / "pp2" / "arxiv" / "train" / "x.jsonl.gz", [{"text": t} for t in _texts(9, 5)])
    code = main(["preprocess", "--input", str(path), "--tokenizer-model", str(bpe_model),
                 "--output-dir", str(tmp_path / "out"), "--workers", "1", "--json-key", "text", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["dataset", "files", "documents", "tokens", "input", "MB", "output", "MB",
                                          "skipped", "seconds"]
    assert out.splitlines()[2].split()[:3] == ["arxiv_train_text_document", "1", "5"]
    assert out.splitlines()[3].split()[:3] == ["total", "1", "5"]
    assert len(IndexedDataset(tmp_path / "out" / "arxiv_train_text_document")) == 5
    assert main(["preprocess", "--input", str(tmp_path / "nothing"), "--tokenizer-model", str(bpe_model),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "megamath preprocess: error: input not found:" in capsys.readouterr().err


def test_help_and_tools_script_state_the_naming_rule():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--help"],
                            capture_output=True, text=True, check=True)
    help_text = " ".join(result.stdout.split())
    assert "DIR/{subset}_{split}_{json_key}_document.{bin,idx}" in help_text
    assert "DIR/{file stem}_{json_key}_document" in help_text
    for flag in ("--input", "--tokenizer-model", "--output-dir", "--workers", "--json-key", "--append-eod",
                 "--no-append-eod", "--strict"):
        assert flag in help_text


def test_format_summary_totals(tmp_path, bpe_model):
    paths = [_write(tmp_path / f"{n}.jsonl", [{"text": t} for t in _texts(n, 3)], [b"[]\n"]) for n in (10, 11)]
    summaries = preprocess(_config(paths, bpe_model, tmp_path / "out", workers=1))
    table = format_summary(summaries).splitlines()
    total = table[4].split()
    assert total[:4] == ["total", "2", "6", f"{sum(s.tokens for s in summaries):,}"] and total[6] == "2"
    assert table[-2:] == ["skipped in 10_text_document: not a JSON object: 1",
                          "skipped in 11_text_document: not a JSON object: 1"]
