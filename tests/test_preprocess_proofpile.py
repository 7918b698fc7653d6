"""Preprocess real ProofPile II data (all subsets and splits) with a real Llama-family tokenizer, once per
module, and check it against counts and ids computed independently of megamath.

The data is the head of every file of the shared sample (its first lines, about LINE_BYTES of each file,
recompressed as .jsonl.zst under the same names): the same subsets, splits, files, file order and record
format, at ~4 % of the sample's 47 M tokens. What is checked here (layout, counts, ids, Megatron's multi-file
glob order, the blend's shares) does not depend on how many tokens there are, and tokenizing the whole
sample twice cost ~20 s of a 2-core machine.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.preprocess import PreprocessConfig, format_summary, preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE = SHARED / "data" / "proof-pile-2-sample"
MODEL = SHARED / "tokenizers" / "llama-family-32k.model"
SUBSETS = ("algebraic-stack", "arxiv", "open-web-math")
SPLITS = ("train", "validation", "test")
LINE_BYTES = 120_000  # per file: whole lines are kept until this many bytes of JSON have been taken (two at least)


def _head(path: Path) -> bytes:
    """The first whole lines of a .jsonl.zst file: up to the one that crosses LINE_BYTES, and two at least
    (an arXiv paper alone is bigger, and two lines per file keep the order within a file checked)."""
    data = b""
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        while chunk := reader.read(1 << 16):
            data += chunk
            first = data.find(b"\n")
            end = data.find(b"\n", max(LINE_BYTES, first + 1)) if first >= 0 else -1
            if end >= 0:
                return data[:end + 1]
    return data  # the whole file is within the budget


def _write_sample_head(folder: Path) -> None:
    """The shared sample's layout with each file cut to its head (see the module docstring)."""
    for subset in SUBSETS:
        for split in SPLITS:
            (folder / subset / split).mkdir(parents=True)
            for path in sorted((SAMPLE / subset / split).glob("*.jsonl.zst")):
                (folder / subset / split / path.name).write_bytes(zstandard.ZstdCompressor().compress(_head(path)))


def _records(sample: Path, subset: str, split: str) -> list[bytes]:
    """The raw lines of one (subset, split), files in name order, read with zstandard directly."""
    lines = []
    for path in sorted((sample / subset / split).glob("*.jsonl.zst"), key=lambda p: p.name):
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
        lines.extend(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"))
    return lines


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not SAMPLE.is_dir() or not MODEL.is_file():
        pytest.skip(f"the shared ProofPile II sample or tokenizer is not present: {SAMPLE}, {MODEL}")
    sample = tmp_path_factory.mktemp("proofpile-sample-head")
    _write_sample_head(sample)
    out = tmp_path_factory.mktemp("proofpile")
    start = time.perf_counter()
    summaries = preprocess(PreprocessConfig(inputs=[sample], tokenizer_model=MODEL, output_dir=out, workers=2,
                                            progress=False))
    seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in summaries)
    print(f"\n{format_summary(summaries)}\nProofPile II sample heads: {tokens:,} tokens in {seconds:.1f} s = "
          f"{tokens / seconds:,.0f} tokens/s with 2 workers")
    return out, {s.name: s for s in summaries}, sample


def test_one_dataset_per_subset_and_split(run):
    out, summaries, _ = run
    names = sorted(f"{subset}_{split}_text_document" for subset in SUBSETS for split in SPLITS)
    assert sorted(summaries) == names
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{ext}" for n in names for ext in (".bin", ".idx"))
    assert all(summary.skipped == {} for summary in summaries.values())


@pytest.mark.parametrize("subset", SUBSETS)
def test_document_counts_and_ids(run, subset):
    out, summaries, sample = run
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    for split in SPLITS:
        records = _records(sample, subset, split)
        dataset = IndexedDataset(out / f"{subset}_{split}_text_document")
        assert len(dataset) == len(records) == summaries[dataset.prefix.name].documents
        assert dataset.num_tokens == summaries[dataset.prefix.name].tokens
        assert str(dataset.dtype) == "uint16"
        picks = sorted({0, len(records) // 2, len(records) - 1}) if split == "train" else [len(records) - 1]
        for i in picks:
            text = json.loads(records[i])["text"]
            assert dataset[i].tolist() == sp.encode(text) + [sp.eos_id()], (subset, split, i)


def test_llemma_mixture_of_the_three_subsets(run, tmp_path):
    """Blending the three training sets 2:4:1 (arxiv, open-web-math, algebraic-stack) realizes each
    dataset's token share within 0.5 % of its weight, counted from the samples the blend serves."""
    from megamath.data.blended_dataset import BlendedDataset

    out, _, _ = run
    names = ("arxiv", "open-web-math", "algebraic-stack")
    datasets = [IndexedDataset(out / f"{name}_train_text_document") for name in names]
    weights = [2.0, 4.0, 1.0]
    seq_length, num_samples = 1024, 20_000
    blend = BlendedDataset(datasets, weights, num_samples, seq_length, seed=1234, cache_dir=tmp_path)
    served = [0, 0, 0]
    for i in range(num_samples):
        served[blend.dataset_of(i)] += len(blend[i])  # tokens each dataset contributed
    total = sum(served)
    for name, weight, tokens, share in zip(names, weights, served, blend.realized_shares()):
        assert abs(tokens / total - weight / 7) <= 0.005 * weight / 7, (name, tokens / total, weight / 7)
        assert tokens / total == pytest.approx(share)


def test_megatron_flags_on_the_train_splits_are_byte_identical(run):
    """tools/preprocess_data.py with Megatron-LM's flags (each train split's shards as a glob, kept in
    order) writes {output_prefix}_text_document byte-identical to `megamath preprocess`."""
    from megamath.compat import megatron_preprocess

    out, _, sample = run
    for subset in SUBSETS:
        prefix = out.parent / f"{out.name}-megatron" / subset
        assert megatron_preprocess.run([
            "--input", str(sample / subset / "train" / "*.jsonl.zst"), "--partitions", "2",
            "--keep-sequential-samples", "--output-prefix", str(prefix), "--json-keys", "text",
            "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(MODEL), "--append-eod",
            "--workers", "2", "--no-progress"]) == 0
        for ext in (".bin", ".idx"):
            assert Path(f"{prefix}_text_document{ext}").read_bytes() == \
                (out / f"{subset}_train_text_document{ext}").read_bytes(), (subset, ext)
