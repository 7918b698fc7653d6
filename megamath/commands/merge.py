"""`megamath merge`: concatenate indexed datasets into one (Megatron's merge_datasets tool).

Document indices are offset, not duplicated at the seams, so the output equals writing every input
document into one writer.
"""
from __future__ import annotations

import os


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="concatenate Megatron .bin/.idx datasets into one",
        description="Merges the inputs, in the order given, into OUTPUT.bin/OUTPUT.idx (written atomically, one merge "
        "or preprocess run at a time per output folder; an existing dataset there is replaced, never one of the "
        "inputs). All inputs must share one token dtype.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PREFIX", help="datasets to merge, in order")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="prefix of the merged dataset")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.data.dataset_tools import merge_datasets, strip_extension
    from megamath.output_path import same_file

    output = strip_extension(args.output)
    # the last component as written: Path("out/") would read as "out" and the files land in out/.bin, out/.idx
    if os.path.basename(output) in ("", ".", ".."):
        raise ValueError(f"--output {args.output!r} names no dataset: give a prefix such as out/merged")
    inputs = [strip_extension(p) for p in args.input]
    for prefix in inputs:  # as every command refuses: the merge would replace one of the datasets it reads
        if same_file(f"{output}.idx", f"{prefix}.idx"):
            raise ValueError(f"--output {args.output} is also an input ({prefix}); writing it would replace that input")
        # An input's .bin alone may be the output's (b.bin a link to a.bin, b.idx its own): publishing the
        # output's .bin would replace that input's tokens under its intact .idx.
        if same_file(f"{output}.bin", f"{prefix}.bin"):
            raise ValueError(f"--output {args.output}: its .bin is also input {prefix}'s .bin (a link or another "
                             "name for it); writing it would replace that input")
    merged = merge_datasets(inputs, output)
    print(f"merged {len(args.input)} datasets into {merged.prefix}: {len(merged)} sequences, "
          f"{merged.num_documents} documents, {merged.num_tokens} tokens ({merged.dtype})")
    return 0
