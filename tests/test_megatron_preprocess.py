"""`tools/preprocess_data.py` with Megatron-LM's flags: Megatron's output names, bytes equal to
`megamath preprocess` and to Megatron's format built here from SentencePiece directly, Megatron's
partition order, and one-line refusals that say what to use instead."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from megamath.cli import main
from megamath.compat import megatron_preprocess
from megamath.data import preprocess as preprocess_module
from test_preprocess import _texts, _write, bpe_model  # noqa: F401  (bpe_model is a fixture)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "preprocess_data.py"


def megatron_bytes(docs: list[list[int]], dtype=np.uint16) -> tuple[bytes, bytes]:
    """(.bin, .idx) as Megatron-LM's IndexedDatasetBuilder writes them: one sequence per document; the
    index is header, version 1, dtype code (uint16: 8, int32: 4), counts, int32 lengths, int64 byte
    pointers, int64 document indices 0..N."""
    code = {np.uint16: 8, np.int32: 4}[dtype]
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * np.dtype(dtype).itemsize
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", len(docs))
           + struct.pack("<Q", len(docs) + 1) + lengths.tobytes() + pointers.astype(np.int64).tobytes()
           + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    return b"".join(np.array(d, dtype=dtype).tobytes() for d in docs), idx


def read_pair(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def megatron_args(inp, prefix, model, *extra, tokenizer="GPTSentencePieceTokenizer"):
    return ["--input", str(inp), "--output-prefix", str(prefix), "--json-keys", "text", "--tokenizer-type",
            tokenizer, "--tokenizer-model", str(model), "--append-eod", "--workers", "1", "--no-progress", *extra]


@pytest.mark.parametrize("tokenizer", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_megatron_flags_match_megamath_preprocess_and_megatron_format(tmp_path, bpe_model, tokenizer):
    texts = _texts(7, 40)
    data = _write(tmp_path / "corpus.json", [{"text": t, "id": i} for i, t in enumerate(texts)])
    prefix = tmp_path / "megatron" / "pp2"
    assert megatron_preprocess.run(megatron_args(data, prefix, bpe_model, tokenizer=tokenizer)) == 0
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["pp2_text_document.bin", "pp2_text_document.idx"]
    # megamath preprocess on the same file (a loose file: DIR/{stem}_text_document).
    data_jsonl = _write(tmp_path / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    assert main(["preprocess", "--input", str(data_jsonl), "--tokenizer-model", str(bpe_model), "--output-dir",
                 str(tmp_path / "megamath"), "--workers", "1", "--no-progress"]) == 0
    assert read_pair(prefix.parent / "pp2_text_document") == read_pair(tmp_path / "megamath" / "corpus_text_document")
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    expected = megatron_bytes([sp.encode(t) + [sp.eos_id()] for t in texts])
    assert read_pair(prefix.parent / "pp2_text_document") == expected


def test_partitions_deal_lines_round_robin_across_files(tmp_path, bpe_model):
    texts = [f"document number {i}: {i} + 1 = {i + 1}" for i in range(11)]
    _write(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts[:6]])
    _write(tmp_path / "in" / "b.jsonl", [{"text": t} for t in texts[6:]])
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    glob = str(tmp_path / "in" / "*.jsonl")
    assert megatron_preprocess.run(megatron_args(glob, tmp_path / "rr", bpe_model, "--partitions", "3")) == 0
    order = [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8]  # line i -> partition i mod 3, partitions concatenated
    assert read_pair(tmp_path / "rr_text_document") == megatron_bytes([sp.encode(texts[i]) + [2] for i in order])
    assert megatron_preprocess.run(megatron_args(glob, tmp_path / "seq", bpe_model, "--partitions", "3",
                                                 "--keep-sequential-samples")) == 0
    assert read_pair(tmp_path / "seq_text_document") == megatron_bytes([sp.encode(t) + [2] for t in texts])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("megatron-partitions-")]  # temporary files gone


def test_partitions_read_inputs_as_the_normal_path_does(tmp_path, bpe_model, capsys):
    """Round robin read inputs through a raw block reader: a 0-byte .zst was an empty shard, a cut archive a
    traceback, a BOM starting a later file cost its first record, and a bad line named a deleted partition."""
    rr = ("--partitions", "2")
    empty, zst = tmp_path / "a" / "x.jsonl.zst", _write(tmp_path / "a" / "w.jsonl.zst", [{"text": "w"}])
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{empty}: empty file \(0 bytes\) is not a valid zst archive$"):
        megatron_preprocess.run(megatron_args(tmp_path / "a" / "*", tmp_path / "out" / "a", bpe_model, *rr))
    cut = _write(tmp_path / "b" / "x.jsonl.gz", [{"text": t} for t in _texts(4, 300)])
    cut.write_bytes(cut.read_bytes()[:-200])
    zst.rename(tmp_path / "b" / "w.jsonl.zst")
    with pytest.raises(ValueError, match=rf"^{cut}: cannot decompress near line \d+: Compressed file ended"):
        megatron_preprocess.run(megatron_args(tmp_path / "b" / "*", tmp_path / "out" / "b", bpe_model, *rr))
    assert not [p.name for p in (tmp_path / "out").iterdir()]  # no dataset, no partition copy left
    first, second = tmp_path / "c" / "1.jsonl", tmp_path / "c" / "2.jsonl"
    _write(first, [{"text": "one"}, {"text": "two"}], [b'{"text": 3}\n', b"\n", b'{"text": "five"}'])
    second.write_bytes(b"\xef\xbb\xbf" + b'{"text": "six"}\n{"oops": 7}\n{"text": "eight"}\n{"text": ""}\n')
    assert megatron_preprocess.run(megatron_args(tmp_path / "c" / "*", tmp_path / "rr", bpe_model, *rr)) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped")]
    # partition 0 holds lines 1, 3, 5 of the first file and 2, 4 of the second; partition 1 the others
    assert skipped == [f"skipped {first}:3: text not a string: 'text' is a number",
                       f"skipped {second}:2: missing json key: no 'text' key (keys: 'oops')",
                       f"skipped {second}:4: empty text: 'text' is an empty string",
                       f"skipped {first}:4: invalid JSON: blank line"]
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    assert read_pair(tmp_path / "rr_text_document") == megatron_bytes(  # "six", after the BOM, is kept
        [sp.encode(t) + [2] for t in ("one", "five", "two", "six", "eight")])
    with pytest.raises(ValueError, match=rf"^{first}:3: text not a string: 'text' is a number \(strict mode"):
        megatron_preprocess.run(megatron_args(tmp_path / "c" / "*", tmp_path / "strict", bpe_model, *rr, "--strict"))


def test_every_partition_line_is_mapped_back_to_its_input_line(tmp_path):
    """Across the dealer's 1 MiB batches and the reader's smaller ones, line k of every batch read from the
    partition copies is line first_line + k * line_step of the input it names."""
    big = _write(tmp_path / "a.jsonl.zst", [], [b'{"i": %d}\n' % i for i in range(120_000)])  # ~1.4 MB of lines
    small = _write(tmp_path / "b.jsonl", [], [b'{"j": %d}\n' % i for i in range(7)] + [b'{"j": "last"}'])
    unpacked = zstandard.ZstdDecompressor().decompress(big.read_bytes(), max_output_size=1 << 24)
    originals = {big: unpacked.split(b"\n"), small: small.read_bytes().split(b"\n")}
    group = megatron_preprocess.deal_round_robin([big, small], 3, tmp_path, "rr")
    seen = []
    for batch in preprocess_module._line_batches([group], 4096):
        lines = batch.data.split(b"\n")[:batch.data.count(b"\n") + (not batch.data.endswith(b"\n"))]
        for k, line in enumerate(lines):
            assert line == originals[batch.file][batch.first_line - 1 + k * batch.line_step]
            seen.append((batch.file, batch.first_line + k * batch.line_step))
    assert len(seen) == 120_008 and len(set(seen)) == 120_008
    # partition 0 first (a's lines 1, 4, 7, ...), partition 2 last, ending at b's line 6 (0-based 120,005 % 3 == 2)
    assert seen[:3] == [(big, 1), (big, 4), (big, 7)] and seen[-1] == (small, 6)


def megatron_documents(docs: list[list[list[int]]]) -> tuple[bytes, bytes]:
    """(.bin, .idx) as Megatron's builder writes `add_document(tokens, lengths)` per document: documents of
    several sequences (a document's sequence lengths in the index, its end in the document indices)."""
    lengths = np.array([len(seq) for doc in docs for seq in doc], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * 2
    ends = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])]).astype(np.int64)
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(lengths), len(ends)) + lengths.tobytes()
           + pointers.astype(np.int64).tobytes() + ends.tobytes())
    return np.array([t for doc in docs for seq in doc for t in seq], dtype=np.uint16).tobytes(), idx


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_list_of_sentences_is_one_document_of_several_sequences(tmp_path, bpe_model, capsys, workers):
    """Megatron's Encoder.encode: a list-valued key (what --split-sentences writes) is one document, a sequence
    per sentence with tokens, the EOS ending the last; megamath skipped it as "text not a string"."""
    records = [{"text": "plain doc"}, {"text": ["First sentence.", "", "Second one.", "x"]},
               {"text": ["", ""]}, {"text": ["a", 7]}, {"text": []}, {"text": ["only one"]}, {"text": "end"}]
    data = _write(tmp_path / "s.jsonl", records)
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    for eod in (True, False):
        args = megatron_args(data, tmp_path / f"m{eod}", bpe_model)
        args[args.index("--workers") + 1] = workers
        assert megatron_preprocess.run(args if eod else [a for a in args if a != "--append-eod"]) == 0
        docs = [[sp.encode(s) for s in ([r["text"]] if isinstance(r["text"], str) else r["text"]) if s]
                for r in records[:2] + records[5:]]
        for doc in docs:
            doc[-1] = doc[-1] + [2] * eod
        assert read_pair(tmp_path / f"m{eod}_text_document") == megatron_documents(docs)
    skipped = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines() if line.startswith("skipped")]
    assert skipped == ["empty text: 'text' is a list of empty strings", "text not a string: 'text' is a list "
                       "holding a number", "empty text: 'text' is an empty list"] * 2
    # `megamath preprocess` stores one sequence per document: a list stays a skipped line there.
    assert main(["preprocess", "--input", str(data), "--tokenizer-model", str(bpe_model), "--output-dir",
                 str(tmp_path / "own"), "--workers", workers, "--no-progress"]) == 0
    assert "s.jsonl:2: text not a string: 'text' is an array" in capsys.readouterr().err


def test_several_json_keys_and_no_eod(tmp_path, bpe_model):
    data = _write(tmp_path / "qa.jsonl", [{"question": f"q {i}?", "answer": f"a = {i}"} for i in range(5)])
    args = megatron_args(data, tmp_path / "qa", bpe_model)
    args[args.index("--json-keys") + 1] = "question"
    args.insert(args.index("--json-keys") + 2, "answer")
    args.remove("--append-eod")
    assert megatron_preprocess.run(args) == 0
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    for key, fmt in (("question", "q {}?"), ("answer", "a = {}")):
        assert read_pair(tmp_path / f"qa_{key}_document") == megatron_bytes([sp.encode(fmt.format(i))
                                                                             for i in range(5)])


@pytest.mark.parametrize("extra, message", [
    (["--split-sentences"], "--split-sentences is not supported: megamath splits no text into sentences"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer is not supported: megamath "
                                               "tokenizes with SentencePiece only: use --tokenizer-type "
                                               "GPTSentencePieceTokenizer"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "use --tokenizer-type GPTSentencePieceTokenizer"),
    (["--find-optimal-num-workers"], "the output is the same for any --workers"),
])
def test_unsupported_flags_fail_with_one_line(tmp_path, bpe_model, extra, message):
    data = _write(tmp_path / "x.jsonl", [{"text": "a"}])
    proc = subprocess.run([sys.executable, str(TOOL), *megatron_args(data, tmp_path / "x", bpe_model), *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("preprocess_data.py: error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and not list(tmp_path.glob("x_*"))


def test_os_error_on_an_output_path_is_one_line(tmp_path, bpe_model):
    """As with `megamath preprocess`: an OS error on a user's path (here a regular file where the output
    folder goes) is one line naming the path, not a NotADirectoryError traceback."""
    data = _write(tmp_path / "x.jsonl", [{"text": "a"}])
    (tmp_path / "file").write_text("a regular file")
    proc = subprocess.run([sys.executable, str(TOOL), *megatron_args(data, tmp_path / "file" / "out" / "x", bpe_model)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"preprocess_data.py: error: {tmp_path / 'file'}: exists and is not a folder\n"


def test_script_runs_both_interfaces(tmp_path, bpe_model):
    data = _write(tmp_path / "d.jsonl", [{"text": t} for t in _texts(3, 5)])
    proc = subprocess.run([sys.executable, str(TOOL), *megatron_args(data, tmp_path / "out" / "d", bpe_model)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, str(TOOL), "--input", str(data), "--tokenizer-model", str(bpe_model),
                           "--output-dir", str(tmp_path / "own"), "--workers", "1", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_pair(tmp_path / "out" / "d_text_document") == read_pair(tmp_path / "own" / "d_text_document")


# The ProofPile II sample's train splits through Megatron's flags are compared with `megamath preprocess`
# in test_preprocess_proofpile.py, which preprocesses the sample once for all its tests.


def test_an_output_prefix_that_names_a_folder_is_refused(tmp_path):
    """`--output-prefix out/` wrote out_text_document.{bin,idx} beside out/ (Path drops the slash), where neither
    the user nor Megatron (out/_text_document.bin) puts it."""
    (tmp_path / "out").mkdir()
    data = _write(tmp_path / "x.jsonl", [{"text": "a"}])
    for prefix in (f"{tmp_path}/out/", f"{tmp_path}/out/."):
        with pytest.raises(ValueError, match=r"^--output-prefix '.*' names a folder, not a dataset: add a name"):
            megatron_preprocess.run(megatron_args(data, prefix, tmp_path / "unused.model"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.jsonl"] and not list((tmp_path / "out").iterdir())
