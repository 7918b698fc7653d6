"""A small math corpus in ProofPile II's released layout, generated here, and a tokenizer trained on it.

The demo and the tests need real-looking data without downloads: this module writes
`ROOT/{algebraic-stack,arxiv,open-web-math}/{train,validation,test}/<name>-0000.jsonl.zst` with records
`{"text": str, "meta": dict}` like ProofPile II, from the templates of megamath.data.demo_documents
(numbers drawn at random, arithmetic worked out correctly), and trains a Llama-style
SentencePiece BPE model on the training split (unk 0, bos 1, eos 2, byte fallback, digits split).
Everything is a pure function of the seed.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from megamath.atomic_io import replace_atomically
from megamath.data.demo_documents import GENERATORS

SUBSETS = ("algebraic-stack", "arxiv", "open-web-math")
SPLITS = ("train", "validation", "test")


@dataclass
class DemoCorpusConfig:
    """What to generate."""

    documents_per_subset: int = 1000
    """Training documents of each subset; validation and test get 5 % each (at least 2)."""
    seed: int = 1234
    """Everything generated is a pure function of this seed."""
    vocab_size: int = 1024
    """Size of the demo SentencePiece model (an upper bound: templates have a small vocabulary)."""


def _records(subset: str, split: str, count: int, rng: random.Random) -> dict[str, list[dict]]:
    """Records per shard name (`python`, `lean`, ...) of one subset and split."""
    shards: dict[str, list[dict]] = {name: [] for name, _ in GENERATORS[subset]}
    for i in range(count):
        name, make = GENERATORS[subset][i % len(GENERATORS[subset])]
        meta = {"source": "megamath-demo", "generator": name, "split": split, "index": i}
        shards[name].append({"text": make(rng), "meta": meta})
    return shards


def write_demo_corpus(root: str | Path, config: DemoCorpusConfig = DemoCorpusConfig()) -> dict[tuple[str, str], int]:
    """Write the corpus under `root`; return the number of records per (subset, split)."""
    root = Path(root)
    counts: dict[tuple[str, str], int] = {}
    compressor = zstandard.ZstdCompressor(level=3)
    for subset_number, subset in enumerate(SUBSETS):
        for split_number, split in enumerate(SPLITS):
            rng = random.Random(config.seed * 1009 + subset_number * 31 + split_number)
            count = config.documents_per_subset if split == "train" else max(2, config.documents_per_subset // 20)
            folder = root / subset / split
            folder.mkdir(parents=True, exist_ok=True)
            for name, records in _records(subset, split, count, rng).items():
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                data = compressor.compress(lines.encode("utf-8"))
                replace_atomically(folder / f"{name}-0000.jsonl.zst", lambda f: f.write(data))
            counts[(subset, split)] = count
    return counts


def _training_lines(root: Path):
    """Lines of the training split's texts: SentencePiece's trainer takes one sentence per item."""
    for path in sorted(root.glob("*/train/*.jsonl.zst")):
        with zstandard.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                for text_line in json.loads(line)["text"].splitlines():
                    if text_line.strip():
                        yield text_line


def train_demo_tokenizer(corpus_root: str | Path, model_path: str | Path, vocab_size: int = 1024) -> Path:
    """Train a Llama-style SentencePiece BPE model on the corpus' training split; write it to model_path."""
    model = _train_tokenizer(Path(corpus_root), vocab_size)
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(model_path, lambda f: f.write(model))
    return model_path


def write_corpus_and_tokenizer(output: str | Path,
                               config: DemoCorpusConfig) -> tuple[dict[tuple[str, str], int], Path]:
    """OUTPUT/corpus/ and OUTPUT/tokenizer.model, replaced only once both are made: the corpus is written into
    a hidden folder beside them and moved into place after its tokenizer trained, so settings SentencePiece
    refuses (a RuntimeError: fewer pieces than the corpus has characters) leave what was there untouched."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".corpus.tmp-", dir=output))
    try:
        counts = write_demo_corpus(staging, config)
        model = _train_tokenizer(staging, config.vocab_size)
        for path in sorted(staging.rglob("*.jsonl.zst")):
            target = output / "corpus" / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    model_path = output / "tokenizer.model"
    replace_atomically(model_path, lambda f: f.write(model))
    return counts, model_path


def _train_tokenizer(corpus_root: Path, vocab_size: int) -> bytes:
    """The serialized SentencePiece model trained on `corpus_root`'s training split."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(Path(corpus_root)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a template corpus may not support every requested piece
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama's special ids
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16384,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()
