"""The generated demo corpus has ProofPile II's layout and records, is deterministic, and its math is right."""
import json

import pytest
import sentencepiece as spm
import zstandard

from megamath.cli import main
from megamath.data.demo_corpus import SPLITS, SUBSETS, DemoCorpusConfig, train_demo_tokenizer, write_demo_corpus

SMALL = DemoCorpusConfig(documents_per_subset=40, seed=7)


def _records(path):
    with zstandard.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "corpus"
    counts = write_demo_corpus(root, SMALL)
    return root, counts


def test_layout_and_records(corpus):
    root, counts = corpus
    for subset in SUBSETS:
        for split in SPLITS:
            shards = sorted((root / subset / split).glob("*.jsonl.zst"))
            assert shards, f"no shards in {subset}/{split}"
            records = [r for shard in shards for r in _records(shard)]
            assert len(records) == counts[(subset, split)]
            assert all(isinstance(r["text"], str) and r["text"] and isinstance(r["meta"], dict) for r in records)
    assert counts[("arxiv", "train")] == 40 and counts[("arxiv", "validation")] == 2


def test_deterministic(corpus, tmp_path):
    root, _ = corpus
    write_demo_corpus(tmp_path, SMALL)
    for shard in root.rglob("*.jsonl.zst"):
        assert (tmp_path / shard.relative_to(root)).read_bytes() == shard.read_bytes()
    other = tmp_path / "other-seed"
    write_demo_corpus(other, DemoCorpusConfig(documents_per_subset=40, seed=8))
    assert (other / "arxiv/train/arxiv-0000.jsonl.zst").read_bytes() != (root / "arxiv/train/arxiv-0000.jsonl.zst").read_bytes()


def test_python_sources_are_correct(corpus):
    """The generated Python files carry asserts of their own results: running them checks the arithmetic."""
    root, _ = corpus
    for record in _records(root / "algebraic-stack" / "train" / "python-0000.jsonl.zst"):
        exec(compile(record["text"], "<demo>", "exec"), {})


def test_tokenizer_is_llama_style(corpus, tmp_path):
    root, _ = corpus
    model = train_demo_tokenizer(root, tmp_path / "tokenizer.model", vocab_size=512)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert 300 < sp.vocab_size() <= 512
    assert sp.encode("12", out_type=str)[-2:] == ["1", "2"]  # digits split one by one
    text = "Let $f(x) = 3x^2$ 漢"  # unseen characters survive through byte fallback
    assert sp.decode(sp.encode(text)) == text


def test_cli(tmp_path, capsys):
    assert main(["demo-corpus", "--output", str(tmp_path), "--documents", "20"]) == 0
    assert (tmp_path / "tokenizer.model").exists()
    assert (tmp_path / "corpus" / "open-web-math" / "test" / "open-web-math-0000.jsonl.zst").exists()
    assert main(["demo-corpus", "--output", str(tmp_path), "--documents", "0"]) == 2
    assert "--documents must be at least 1, got 0" in capsys.readouterr().err


def test_cli_vocab_size_too_small_is_one_line(tmp_path, capsys):
    """SentencePiece refuses a vocabulary smaller than the corpus's characters with a RuntimeError: bad
    input all the same, so one line, not a traceback; and what an earlier run wrote is left as it was (the
    corpus of the new seed replaced it before the tokenizer failed, leaving a corpus its tokenizer was not
    trained on)."""
    assert main(["demo-corpus", "--output", str(tmp_path), "--documents", "2"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["demo-corpus", "--output", str(tmp_path), "--documents", "2", "--seed", "7", "--vocab-size",
                 "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("megamath demo-corpus: error: --vocab-size 10: SentencePiece cannot train the demo "
                          "tokenizer: Vocabulary size is smaller than required_chars")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no staging folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "eval", "tokenizer.model"]
    assert main(["demo-corpus", "--output", str(tmp_path), "--documents", "2", "--vocab-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "megamath demo-corpus: error: --vocab-size must be at least 1, got 0"
