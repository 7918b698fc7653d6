"""Megatron-LM's `tools/preprocess_data.py` command line, run by megamath's preprocessing.

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/pp2 --json-keys text \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tokenizer.model --append-eod --workers 8

writes `out/pp2_text_document.{bin,idx}`: Megatron's `{output_prefix}_{key}_document` naming, and the bytes
Megatron-LM writes for the same input and tokenizer. Megatron-LM (since its 2026 tokenizer rewrite) runs
its three SentencePiece tokenizer types the same way: the ids of `encode(text)`, no BOS, and with
`--append-eod` the model's EOS after each document; megamath's `preprocess` stores exactly that, so
the files are also byte-identical to `megamath preprocess` on the same file (of string texts: see below).

A list of strings under a key (the sentences Megatron's `--split-sentences` writes) is one document of
several sequences, as Megatron writes it: one sequence per sentence that has tokens, the EOS (with
`--append-eod`) ending the last. `megamath preprocess` skips such a line (text not a string).

Megatron's `--partitions N` deals the input lines out round robin (line i to partition i mod N), encodes
each partition and concatenates them in partition order; `--keep-sequential-samples` deals contiguous
chunks instead, which keeps the input order. The documents are written in that same order here; the
partition files are made in a temporary folder and removed (Megatron leaves `{input}_{i}` files next to
the input and `{output_prefix}_{i}_*` datasets next to the output). Inputs are read, and bad lines
reported at their input file:line, exactly as without partitions.

Every flag of Megatron's parser is accepted or refused with one line (Megatron-LM as of August 2026: its
preprocess_data.py adds the shared tokenizer flags of megatron/training/config's TokenizerConfig). Tokenizer
flags Megatron reads only for other tokenizer types are ignored, as Megatron ignores them for SentencePiece;
`--vocab-extra-ids` is ignored because Megatron's preprocess_data.py resets it to 0. Flags that would change
Megatron's ids are refused: special tokens, the legacy wrapper with `--append-eod` (Megatron fails there; alone
it encodes the same), keeping extra whitespace on a model that collapses it (a no-op on Llama's, accepted),
and a metadata file that names another library, another class, or attributes of its own.

Differences on input Megatron cannot read: invalid JSON lines, which stop Megatron, are skipped and
reported (`--strict` stops); an empty text, which Megatron stores as an empty document, is skipped and
reported; `.jsonl.zst` inputs are read directly; glob matches are read in sorted name order.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

from megamath.atomic_io import naming_write_errors, remove_dead_temporaries, temp_tag
from megamath.data.preprocess import PreprocessConfig, default_workers, format_summary, preprocess
from megamath.data.sources import InputGroup, read_line_batches
from megamath.data.tokenizer import load_sentencepiece
from megamath.input_path import read_text

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# Megatron-LM's other tokenizer types, refused with what to use instead.
OTHER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "BertWordPieceLowerCase", "BertWordPieceCase",
               "TikTokenizer", "NullTokenizer", "MultimodalTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")
# Megatron-LM's tokenizer flags that no SentencePiece type reads (there, as here): accepted and ignored.
_VOCAB = "sizes a model's embedding, not the data"
_HF = "BERT, GPT2 and HuggingFace tokenizers only"
_IGNORED = (
    (["--vocab-size"], {"type": int}, "TikTokenizer and NullTokenizer only"),
    (["--padded-vocab-size"], {"type": int}, _VOCAB),
    (["--no-pad-vocab-size", "--disable-pad-vocab-size"], {"action": "store_false", "dest": "pad_vocab_size"}, _VOCAB),
    (["--vocab-file"], {}, _HF),
    (["--merge-file"], {}, _HF),
    (["--vocab-extra-ids"], {"type": int, "default": 0}, "Megatron's preprocess_data.py resets it to 0"),
    (["--tiktoken-pattern"], {"choices": ["v1", "v2"]}, "TikTokenizer only"),
    (["--tiktoken-num-special-tokens"], {"type": int, "default": 1000}, "TikTokenizer only"),
    (["--tokenizer-hf-no-use-fast"], {"action": "store_true"}, _HF),
    (["--tokenizer-hf-no-include-special-tokens"], {"action": "store_true"}, _HF),
    (["--trust-remote-code"], {"action": "store_true"}, _HF),
    (["--use-gigatoken"], {"action": "store_true"}, _HF),
    (["--null-tokenizer-eod-id"], {"type": int}, "NullTokenizer only"),
    (["--null-tokenizer-pad-id"], {"type": int, "default": -1}, "NullTokenizer only"),
    (["--chat-template"], {}, "kept for formatting conversations; preprocessing encodes plain text"),
)
# What a metadata file may hold for Megatron to run the tokenizer it runs without one.
_METADATA_CLASSES = {None, ("megatron.core.tokenizers.text.text_tokenizer", "MegatronTokenizerText"),
                     ("megatron.core.tokenizers.text", "MegatronTokenizerText")}
_METADATA_KEYS = {"library", "class_name", "class_path", "chat_template"}
USE_INSTEAD = ("megamath tokenizes with SentencePiece only: use --tokenizer-type GPTSentencePieceTokenizer "
               "--tokenizer-model tokenizer.model (the Llama / Code Llama tokenizer)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/preprocess_data.py", description="Megatron-LM's preprocess_data.py flags, run by megamath: "
        "jsonl -> {output_prefix}_{key}_document.{bin,idx}. (megamath's own flags, --output-dir and the "
        "ProofPile II naming, are those of `megamath preprocess`.)")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="a jsonl file (with --partitions > 1: a glob of files)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    group.add_argument("--split-sentences", action="store_true", help="not supported (refused)")
    group.add_argument("--keep-newlines", action="store_true", help="only used with --split-sentences")
    group.add_argument("--lang", default="english", help="only used with --split-sentences")
    group = parser.add_argument_group("tokenizer", "Megatron-LM's shared tokenizer flags (TokenizerConfig). "
                                      "IGNORED: flags Megatron-LM does not use for SentencePiece types either.")
    group.add_argument("--tokenizer-type", required=True, metavar="TYPE",
                       help=f"one of {', '.join(SENTENCEPIECE_TYPES)}")
    group.add_argument("--tokenizer-model", help="SentencePiece tokenizer.model")
    group.add_argument("--tokenizer-metadata", dest="metadata_path", metavar="JSON",
                       help="Megatron's tokenizer_metadata.json: accepted when it names the sentencepiece library "
                       "and Megatron's default text tokenizer class (what it then runs), refused otherwise")
    group.add_argument("--tokenizer-special-tokens", dest="special_tokens", nargs="+", metavar="TOKEN",
                       help="not supported (refused): megamath adds no tokens to a SentencePiece model")
    group.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                       help="Megatron's legacy SentencePiece wrapper: the same ids without special tokens; "
                       "refused with --append-eod (that wrapper has no EOS id there, and Megatron fails)")
    group.add_argument("--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
                       "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces", action="store_false",
                       dest="tokenizer_sentencepiece_ignore_extra_whitespaces",
                       help="no effect for a model that keeps runs of spaces (Llama's), as in Megatron; refused "
                       "for a model that collapses them (Megatron then encodes space runs its own way)")
    for flags, kind, ignored in _IGNORED:
        group.add_argument(*flags, **kind, help=f"IGNORED ({ignored})")
    group.add_argument("--append-eod", action="store_true", help="append the EOS id after every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path of the outputs without _{key}_document.bin")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, required=True, help="worker processes (output identical for any)")
    group.add_argument("--partitions", type=int, default=1, help="deal the input lines over N partitions")
    group.add_argument("--log-interval", type=int, default=1000, help="accepted; megamath shows a progress bar")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="with --partitions > 1: contiguous chunks, the input order kept")
    group.add_argument("--find-optimal-num-workers", action="store_true", help="not supported (refused)")
    group.add_argument("--workers-to-check", nargs="+", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--max-documents", type=int, default=None, help=argparse.SUPPRESS)
    group = parser.add_argument_group("megamath")
    group.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def check_supported(args) -> None:
    """One-line errors for what megamath does not do, each saying what to use instead."""
    if args.split_sentences:
        raise ValueError("--split-sentences is not supported: megamath splits no text into sentences (GPT "
                         "training, Megatron's default, keeps one sequence per document); drop the flag (texts "
                         "already split, JSON lists of sentences, are read as Megatron reads them)")
    if args.find_optimal_num_workers:
        raise ValueError("--find-optimal-num-workers is not supported: the output is the same for any --workers; "
                         "time worker counts with perf/bench_data.py preprocess --workers 1 2 4 ...")
    if args.tokenizer_type not in SENTENCEPIECE_TYPES:
        known = "" if args.tokenizer_type in OTHER_TYPES else " (not a Megatron-LM tokenizer type)"
        if args.tokenizer_type in ("Llama3Tokenizer", "MistralTokenizer"):
            known = " (no longer a Megatron-LM tokenizer type: Megatron-LM runs those models with HuggingFaceTokenizer)"
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} is not supported{known}: {USE_INSTEAD}")
    if not args.tokenizer_model:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model tokenizer.model")
    if args.special_tokens:
        raise ValueError("--tokenizer-special-tokens is not supported: megamath encodes text with the model's own "
                         "pieces (Megatron-LM takes special tokens for SentencePiece only with "
                         "--tokenizer-sentencepiece-legacy, then cuts texts at them and gives new ones new ids)")
    if args.tokenizer_sentencepiece_legacy and args.append_eod:
        raise ValueError("--tokenizer-sentencepiece-legacy with --append-eod is not supported: Megatron-LM's legacy "
                         "SentencePiece wrapper has no EOS id when built from these flags, and fails at the "
                         "first document; drop --tokenizer-sentencepiece-legacy (alone it gives the same ids)")
    if args.workers < 1 or args.partitions < 1:
        raise ValueError("--workers and --partitions must be at least 1")
    if os.path.basename(args.output_prefix) in ("", ".", ".."):  # Path("out/") is "out": out_text_document beside out/
        raise ValueError(f"--output-prefix {args.output_prefix!r} names a folder, not a dataset: add a name, "
                         "e.g. out/pp2 for out/pp2_text_document.bin")


def check_metadata(path: str) -> None:
    """Megatron reads --tokenizer-metadata instead of its {'library': 'sentencepiece'} default: its library, and
    its class (class_path.class_name), choose the tokenizer run; its keys become the tokenizer's attributes."""
    what = f"--tokenizer-metadata {path}"
    try:
        meta = json.loads(read_text(path, "--tokenizer-metadata", "a JSON file"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: not a JSON object, as Megatron's tokenizer metadata is")
    if meta.get("library") != "sentencepiece":
        raise ValueError(f"{what} names the tokenizer library {meta.get('library')!r}, which Megatron-LM would then "
                         f"run instead of SentencePiece: {USE_INSTEAD}")
    name = meta.get("class_name")
    if ((meta.get("class_path"), name) if name else None) not in _METADATA_CLASSES:
        raise ValueError(f"{what} names the tokenizer class {meta.get('class_path')}.{name}, which megamath cannot "
                         "run; drop the flag to run Megatron's default SentencePiece tokenizer")
    if set(meta) - _METADATA_KEYS:
        raise ValueError(f"{what} sets {', '.join(sorted(set(meta) - _METADATA_KEYS))}, which Megatron-LM sets as "
                         f"attributes of its tokenizer; megamath accepts only the keys Megatron writes: "
                         f"{', '.join(sorted(_METADATA_KEYS))}")


def check_whitespace_flag(args) -> None:
    """Megatron's --no-tokenizer-sentencepiece-ignore-extra-whitespaces acts only on a model that encodes 'x  y'
    as it encodes 'x y' (collapses runs of spaces); Llama's keeps them, and there the flag does nothing."""
    if args.tokenizer_sentencepiece_ignore_extra_whitespaces:
        return
    sp = load_sentencepiece(args.tokenizer_model)
    if sp.encode("x  y", out_type=str) == sp.encode("x y", out_type=str):
        raise ValueError("--no-tokenizer-sentencepiece-ignore-extra-whitespaces is not supported for "
                         f"{args.tokenizer_model}: this model collapses runs of spaces, where Megatron-LM encodes "
                         "them its own way and megamath does not; drop the flag")


def input_files(spec: str, partitions: int) -> list[Path]:
    """Megatron opens --input as one file; with --partitions > 1 it is a glob (sorted here)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    matches = sorted(Path(m) for m in glob.glob(spec) if Path(m).is_file())
    if matches and partitions > 1:
        return matches
    raise FileNotFoundError(f"--input {spec}: no such file" + (" (a glob needs --partitions > 1, as in Megatron)"
                                                                if matches else ""))


def deal_round_robin(files: Sequence[Path], partitions: int, folder: Path, name: str) -> InputGroup:
    """Megatron's partition files: line i of the inputs (counted across files) goes to partition i mod N,
    and the partitions are read in order.

    Inputs are read as `megamath preprocess` reads them (read_line_batches: a 0-byte or corrupt archive is
    an error naming the file, a BOM is dropped, each file's last line is a line). Each input's share of a
    partition is a copy of its own, whose lines are every N-th line of that input: the group's origins map
    a bad line back to the input's file:line.
    """
    copies: list[list[tuple[Path, tuple[Path, int, int]]]] = [[] for _ in range(partitions)]  # per partition
    dealt = 0  # lines dealt so far, across files
    # the partitions are copies of the input, as large: a full disk is likeliest here, and would name no file
    with naming_write_errors(folder, "the inputs are untouched and nothing was written under --output-prefix"):
        for k, path in enumerate(files):
            names = [folder / f"partition_{p}_{k}.jsonl" for p in range(partitions)]
            first = dealt  # the global index of this file's line 1
            with ExitStack() as stack:
                outs = [stack.enter_context(open(name, "wb")) for name in names]
                for batch in read_line_batches(path, 0, 1 << 20):
                    lines = batch.data.split(b"\n")
                    if not lines[-1]:
                        lines.pop()  # the newline that ends the batch's last line
                    for j in range(min(partitions, len(lines))):
                        outs[(dealt + j) % partitions].write(b"\n".join(lines[j::partitions]) + b"\n")
                    dealt += len(lines)
            for p in range(partitions):  # partition p's first line of this file: line (p - first) % N + 1
                copies[p].append((names[p], (path, (p - first) % partitions + 1, partitions)))
    files_and_origins = [copy for partition in copies for copy in partition]
    return InputGroup(name, tuple(f for f, _ in files_and_origins), origins=tuple(o for _, o in files_and_origins))


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    check_supported(args)
    if args.metadata_path is not None:
        check_metadata(args.metadata_path)
    check_whitespace_flag(args)
    files = input_files(args.input, args.partitions)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(prefix.parent, ".megatron-partitions-")  # a killed run's copy of its input
    with tempfile.TemporaryDirectory(prefix=f".megatron-partitions-{temp_tag()}-", dir=prefix.parent) as tmp:
        # One dataset per key: Megatron's {output_prefix}_{key}_document, made of the files in this order.
        group = InputGroup(prefix.name, tuple(files))
        if args.partitions > 1 and not args.keep_sequential_samples:
            group = deal_round_robin(files, args.partitions, Path(tmp), prefix.name)
        for key in args.json_keys:
            config = PreprocessConfig(inputs=[str(f) for f in files], tokenizer_model=args.tokenizer_model,
                                      output_dir=prefix.parent, workers=args.workers or default_workers(),
                                      json_key=key, append_eod=args.append_eod, strict=args.strict,
                                      progress=args.progress, sentence_lists=True)
            print(format_summary(preprocess(config, groups=[group])))
    return 0


def wants_megatron_flags(argv: Sequence[str]) -> bool:
    """Megatron's interface is chosen by its required flag; megamath's (--output-dir) otherwise."""
    return any(a == "--output-prefix" or a.startswith("--output-prefix=") for a in argv) or \
        not any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv)

