"""`megamath inspect` and `megamath merge` through the CLI entry point: output, results, and bad-input errors."""
import io

import numpy as np
import pytest
import sentencepiece as spm

from megamath.cli import main
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.run_lock import FolderLock

TEXTS = [
    "The sum of 12 and 30 is 42, since 12 + 30 = 42.",
    "Let x be a prime. Then x divides a*b implies x divides a or x divides b.",
    "theorem add_comm (a b : Nat) : a + b = b + a := by omega",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny SentencePiece model trained here, so the test needs no files from outside the repo."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_item(np.asarray(seq))
            w.end_document()
    return prefix


def test_inspect_header_and_lengths(tmp_path, capsys):
    # Documents of 3, 7 (two sequences) and 2 tokens.
    write(tmp_path / "d", [[[1, 2, 3]], [[4, 5, 6, 7], [8, 9, 10]], [[11, 12]]])
    assert main(["inspect", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    for line in ["version:    1", "dtype:      uint16 (code 8)", "sequences:  4", "documents:  3",
                 "tokens:     12", ".bin bytes: 24", "document length: min 2  mean 4.0  max 7",
                 "[0] 3 tokens: [1, 2, 3]", "[1] 7 tokens: [4, 5, 6, 7, 8, 9, 10]", "[2] 2 tokens: [11, 12]"]:
        assert line in out.splitlines(), line


def test_inspect_accepts_a_file_name_and_limits_show(tmp_path, capsys):
    write(tmp_path / "d", [[list(range(30))], [[1]]], np.int32)
    assert main(["inspect", str(tmp_path / "d.idx"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "dtype:      int32 (code 4)" in out
    assert f"[0] 30 tokens: {list(range(20))} ..." in out and "[1]" not in out


def test_inspect_empty_dataset(tmp_path, capsys):
    write(tmp_path / "e", [])
    assert main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "sequences:  0" in out and "document length: n/a (no documents)" in out


def test_inspect_decodes_with_tokenizer(tmp_path, capsys, tokenizer):
    path, processor = tokenizer
    long_text = " ".join(TEXTS * 4)  # longer than the preview
    write(tmp_path / "d", [[processor.encode(TEXTS[0])], [processor.encode(long_text)]])
    assert main(["inspect", str(tmp_path / "d"), "--tokenizer-model", str(path), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert repr(TEXTS[0]) in out
    preview = next(line for line in out.splitlines() if line.startswith("[1] "))
    assert preview.endswith(" ...") and repr(long_text[:200]) in preview


def test_inspect_bad_inputs_exit_2(tmp_path, capsys, tokenizer):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"megamath inspect: error: indexed dataset file not found: {tmp_path / 'missing'}.idx"

    write(tmp_path / "d", [[[1, 2, 3]]])
    (tmp_path / "d.bin").write_bytes(b"\x00" * 4)
    assert main(["inspect", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == (f"megamath inspect: error: {tmp_path / 'd'}.bin: has 4 bytes but its "
                                               "index describes 3 tokens of uint16 = 6 bytes")

    path, processor = tokenizer
    write(tmp_path / "big", [[[5, processor.get_piece_size() + 10]]])
    assert main(["inspect", str(tmp_path / "big"), "--tokenizer-model", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"document 0 holds token id {processor.get_piece_size() + 10}, outside the tokenizer's" in err

    assert main(["inspect", str(tmp_path / "big"), "--tokenizer-model", str(tmp_path / "no.model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"megamath inspect: error: tokenizer model not found: {tmp_path / 'no.model'}"


def test_inspect_decode_refuses_ids_no_tokenizer_has(tmp_path, capsys, tokenizer):
    """A negative id (signed dtypes) or a float dataset is the same mismatch as an id past the vocabulary:
    one error line, not SentencePiece's IndexError / TypeError traceback."""
    path, _ = tokenizer
    write(tmp_path / "neg", [[[5, -3, 7]]], np.int32)
    assert main(["inspect", str(tmp_path / "neg"), "--tokenizer-model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megamath inspect: error: document 0 holds token id -3, outside the tokenizer's")
    write(tmp_path / "float", [[[5.0, 3.0]]], np.float32)
    assert main(["inspect", str(tmp_path / "float"), "--tokenizer-model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"megamath inspect: error: {tmp_path / 'float'} holds float32 values, not token ids: "
                   "it cannot be decoded with --tokenizer-model")
    assert main(["inspect", str(tmp_path / "float")]) == 0  # without a tokenizer it still shows the values


def test_merge_equals_single_writer(tmp_path, capsys):
    docs = [[[1, 2, 3]], [[4, 5], [6]], [[7]], [[8, 9, 10, 11]]]
    write(tmp_path / "a", docs[:2])
    write(tmp_path / "b", docs[2:])
    write(tmp_path / "single", docs)
    assert main(["merge", "--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m")]) == 0
    assert "merged 2 datasets into" in capsys.readouterr().out
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"single{ext}").read_bytes()
    assert IndexedDataset(tmp_path / "m").document_indices.tolist() == [0, 1, 3, 4, 5]


def test_merge_bad_inputs_exit_2(tmp_path, capsys):
    write(tmp_path / "a", [[[1]]], np.uint16)
    write(tmp_path / "b", [[[1]]], np.int32)
    assert main(["merge", "--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"megamath merge: error: cannot merge {tmp_path / 'b'} (int32) with {tmp_path / 'a'} (uint16): "
        "all inputs must share one dtype")
    assert main(["merge", "--input", str(tmp_path / "a"), str(tmp_path / "nope"), "--output", str(tmp_path / "m")]) == 2
    assert "indexed dataset file not found" in capsys.readouterr().err
    assert not (tmp_path / "m.idx").exists()


def test_merge_refuses_an_output_whose_bin_is_an_inputs(tmp_path, capsys):
    """b.bin a link to a.bin, b.idx its own: merging b into a replaced a.bin, so b read the merge's tokens."""
    write(tmp_path / "a", [[[1, 2, 3]]])
    write(tmp_path / "c", [[[7, 8]]])
    (tmp_path / "b.bin").symlink_to("a.bin")
    (tmp_path / "b.idx").write_bytes((tmp_path / "a.idx").read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["merge", "--input", str(tmp_path / "b"), str(tmp_path / "c"), "--output", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (f"megamath merge: error: --output {tmp_path / 'a'}: its .bin is also input "
                                       f"{tmp_path / 'b'}'s .bin (a link or another name for it); writing it would "
                                       "replace that input\n")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert IndexedDataset(tmp_path / "b")[0].tolist() == [1, 2, 3]


def test_a_second_writer_in_the_output_folder_is_refused(tmp_path, capsys):
    """Two merges into one prefix raced between the .bin and .idx renames (one failed on its own output)."""
    write(tmp_path / "in" / "a", [[[1, 2, 3]]])
    argv = ["merge", "--input", str(tmp_path / "in" / "a"), "--output", str(tmp_path / "out" / "m")]
    with FolderLock(tmp_path / "out", "merge"):  # another merge, or a preprocess run into that folder
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"megamath merge: error: {tmp_path / 'out'} is in use by another merge (pid ") and \
            err.count("\n") == 1, err
        assert not list((tmp_path / "out").glob("m*"))
    assert main(argv) == 0 and IndexedDataset(tmp_path / "out" / "m").num_documents == 1
