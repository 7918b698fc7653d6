"""`megamath inspect`: print an indexed dataset's header and statistics, and optionally decode a few documents.

The first thing to run on a `.bin`/`.idx` pair of unknown origin: opening it validates the whole index,
and decoding the first documents with the tokenizer shows whether the two belong together.
"""
from __future__ import annotations

from pathlib import Path

PREVIEW_CHARS = 200
PREVIEW_TOKENS = 20


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="print the header and statistics of a Megatron .bin/.idx dataset",
        description="Validates PREFIX.idx and PREFIX.bin, prints version, dtype, sequences, documents, "
        "tokens, .bin bytes and document lengths; with --tokenizer-model, decodes the first documents.",
    )
    parser.add_argument("prefix", metavar="PREFIX", help="dataset path without .bin/.idx (either is stripped)")
    parser.add_argument("--tokenizer-model", type=Path, default=None, help="SentencePiece model to decode with")
    parser.add_argument("--show", type=int, default=3, metavar="N",
                        help="documents to preview: decoded text with a tokenizer, else their first token ids")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.data.dataset_tools import document_lengths, document_tokens, strip_extension
    from megamath.data.indexed_dataset import CODE_OF, IndexedDataset

    if args.show < 0:
        raise ValueError(f"--show must be at least 0, got {args.show}")
    processor = None
    if args.tokenizer_model is not None:
        from megamath.data.tokenizer import load_sentencepiece

        processor = load_sentencepiece(args.tokenizer_model)
    dataset = IndexedDataset(strip_extension(args.prefix))
    if processor is not None and dataset.dtype.kind not in "iu":
        raise ValueError(f"{dataset.prefix} holds {dataset.dtype} values, not token ids: it cannot be decoded "
                         "with --tokenizer-model")
    code = CODE_OF[dataset.dtype]
    lengths = document_lengths(dataset)
    print(f"prefix:     {dataset.prefix}")
    print(f"version:    {dataset.version}")
    print(f"dtype:      {dataset.dtype} (code {code})")
    print(f"sequences:  {len(dataset)}")
    print(f"documents:  {dataset.num_documents}")
    print(f"tokens:     {dataset.num_tokens}")
    print(f".bin bytes: {dataset.bin_bytes}")
    if len(lengths):
        print(f"document length: min {lengths.min()}  mean {lengths.mean():.1f}  max {lengths.max()}")
    else:
        print("document length: n/a (no documents)")
    for d in range(min(args.show, dataset.num_documents)):
        tokens = document_tokens(dataset, d)
        if processor is None:
            more = " ..." if len(tokens) > PREVIEW_TOKENS else ""
            print(f"[{d}] {len(tokens)} tokens: {tokens[:PREVIEW_TOKENS].tolist()}{more}")
            continue
        bad = tokens[(tokens < 0) | (tokens >= processor.get_piece_size())]  # negative ids: signed dtypes
        if len(bad):
            raise ValueError(f"document {d} holds token id {int(bad[0])}, outside the tokenizer's "
                             f"{processor.get_piece_size()} pieces: is {args.tokenizer_model} the tokenizer "
                             "this dataset was made with?")
        text = processor.decode(tokens.tolist())
        more = " ..." if len(text) > PREVIEW_CHARS else ""
        print(f"[{d}] {len(tokens)} tokens: {text[:PREVIEW_CHARS]!r}{more}")
    return 0
