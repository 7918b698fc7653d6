#!/usr/bin/env python
"""Megatron-LM's `tools/preprocess_data.py`, with its flags, run by megamath's preprocessing.

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/name --json-keys text \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tokenizer.model --append-eod --workers 8

writes out/name_text_document.{bin,idx}, byte-identical to Megatron-LM's output for the same input and
tokenizer (SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer; see
megamath/compat/megatron_preprocess.py). Every other flag of Megatron's parser, its shared tokenizer flags
included, is ignored where Megatron ignores it for SentencePiece, and refused with one line (exit status 2)
where it would change Megatron's ids or make Megatron fail. Called with megamath's own flags (--output-dir, no
--output-prefix) it is `megamath preprocess`, which names outputs per ProofPile II subset and split.
"""
import sys
from pathlib import Path

# Runnable from a checkout without installing: the repository root holds the `megamath` package. Appended:
# an installed megamath comes first, and the root's kernels/ never shadows the package named `kernels` that
# transformers imports since 5.25.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from megamath.cli import _one_line, main  # noqa: E402
from megamath.compat import megatron_preprocess  # noqa: E402


def megatron_main(argv: list[str]) -> int:
    try:
        return megatron_preprocess.run(argv)
    except (ValueError, OSError) as err:  # bad input or an OS error on a user's path, as `megamath` reports them
        print(f"preprocess_data.py: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv in (["-h"], ["--help"]):  # both interfaces: Megatron's flags, then megamath's own
        megatron_preprocess.build_parser().print_help()
        print("\nWith --output-dir instead of --output-prefix, megamath's own interface (megamath preprocess):\n")
        sys.exit(main(["preprocess", "--help"]))
    if megatron_preprocess.wants_megatron_flags(argv):
        sys.exit(megatron_main(argv))
    sys.exit(main(["preprocess", *argv]))
