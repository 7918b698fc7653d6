"""`megamath demo-corpus`: write the generated demo corpus (ProofPile II layout) and train its tokenizer."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="generate a small math corpus in ProofPile II's layout and a SentencePiece tokenizer for it",
        description="Writes OUTPUT/corpus/{algebraic-stack,arxiv,open-web-math}/{train,validation,test}/"
        "*.jsonl.zst, OUTPUT/tokenizer.model and OUTPUT/eval/demo-arith.jsonl (held-out arithmetic problems "
        "from the same templates, for `megamath eval --task demo-arith`). No downloads: everything is generated "
        "from the seed. Files already there are replaced (each written whole, then renamed into place): the same "
        "flags write the same files, other flags a new tokenizer that datasets preprocessed with the old one do "
        "not match.",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to write into")
    parser.add_argument("--documents", type=int, default=1000, help="training documents per subset (default 1000)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the corpus, the tokenizer and the demo-arith problems (default 1234)")
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="upper bound on the tokenizer's pieces (default 1024; examples/tiny.yaml's model "
                        "has 2048 ids)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.data.demo_corpus import DemoCorpusConfig, write_corpus_and_tokenizer
    from megamath.evaluation.demo_arith import write_problems

    if args.documents < 1:
        raise ValueError(f"--documents must be at least 1, got {args.documents}")
    if args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be at least 1, got {args.vocab_size}")
    config = DemoCorpusConfig(documents_per_subset=args.documents, seed=args.seed, vocab_size=args.vocab_size)
    try:
        counts, model = write_corpus_and_tokenizer(args.output, config)
    except RuntimeError as err:  # how SentencePiece refuses settings, e.g. fewer pieces than the corpus has characters
        reason = str(err).rsplit("] ", 1)[-1].strip() or str(err)
        raise ValueError(f"--vocab-size {args.vocab_size}: SentencePiece cannot train the demo tokenizer: "
                         f"{reason}") from None
    problems = write_problems(args.output / "eval" / "demo-arith.jsonl", seed=args.seed)
    for (subset, split), count in counts.items():
        print(f"{subset:>16} {split:<10} {count:>6} documents")
    print(f"corpus:    {args.output / 'corpus'}\ntokenizer: {model}\neval:      {problems}")
    return 0
