#!/usr/bin/env python
"""Run a real Megatron-LM checkout's tools/preprocess_data.py and megamath's, with the same flags, and
compare the output files byte for byte.

    python tools/compare_with_megatron.py --megatron-lm PATH/TO/Megatron-LM [--megatron-python PY] \\
        --input data.jsonl --tokenizer-model tokenizer.model [--partitions 2] [--workers 2]

For each SentencePiece tokenizer type (or --tokenizer-type), both write {out}/{side}/{type}_text_document;
the script prints `identical` or the first differing byte per file and exits 1 on any difference.
Megatron-LM needs its own Python (recent checkouts need 3.12+ and torch); Megatron writes its partition
files next to --input, so the input is copied into the work folder first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


def first_difference(a: bytes, b: bytes) -> str:
    if a == b:
        return "identical"
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differ at byte {n} (sizes {len(a)} and {len(b)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", type=Path, required=True, help="a Megatron-LM checkout")
    parser.add_argument("--megatron-python", default=sys.executable, help="Python that can import Megatron-LM")
    parser.add_argument("--input", type=Path, required=True, help="a jsonl file")
    parser.add_argument("--tokenizer-model", type=Path, required=True)
    parser.add_argument("--tokenizer-type", choices=TYPES, nargs="+", default=list(TYPES))
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep-sequential-samples", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given (default: a temporary one)")
    args = parser.parse_args()
    megatron_script = args.megatron_lm / "tools" / "preprocess_data.py"
    for path, what in ((megatron_script, "--megatron-lm: no tools/preprocess_data.py in that checkout"),
                       (args.input, "--input: no such file"),
                       (args.tokenizer_model, "--tokenizer-model: no such file")):
        if not path.is_file():  # before the work folder exists, which a failed run would leave behind
            parser.error(f"{what}: {path}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="megatron-compare-"))
    try:
        return compare(args, megatron_script, work)
    except ValueError as err:  # e.g. a --megatron-python that cannot be started: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    finally:  # a failed comparison leaves no temporary folder behind; a --work-dir is kept to look into
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def compare(args, megatron_script: Path, work: Path) -> int:
    """Run both sides per tokenizer type in `work`; 0 when every file is identical, 1 if not, 2 on failure."""
    failures = 0
    for kind in args.tokenizer_type:
        outputs = {}
        for side, python, script in (("megatron", args.megatron_python, megatron_script),
                                     ("megamath", sys.executable, REPO / "tools" / "preprocess_data.py")):
            folder = work / side / kind
            folder.mkdir(parents=True, exist_ok=True)
            data = folder / args.input.name  # Megatron writes {input}_{i} partition files beside its input
            shutil.copyfile(args.input, data)
            flags = ["--input", str(data), "--output-prefix", str(folder / kind), "--json-keys", "text",
                     "--tokenizer-type", kind, "--tokenizer-model", str(args.tokenizer_model), "--append-eod",
                     "--workers", str(args.workers), "--partitions", str(args.partitions)]
            flags += ["--keep-sequential-samples"] if args.keep_sequential_samples else []
            env = dict(os.environ, PYTHONPATH=str(args.megatron_lm if side == "megatron" else REPO))
            try:
                proc = subprocess.run([python, str(script), *flags], env=env, capture_output=True, text=True)
            except OSError as err:
                raise ValueError(f"--megatron-python: cannot run {python}: {err.strerror}") from None
            if proc.returncode:
                print(f"{side} {kind} failed:\n{proc.stderr[-3000:]}")
                return 2
            outputs[side] = folder / f"{kind}_text_document"
        for ext in (".bin", ".idx"):
            a = Path(f"{outputs['megatron']}{ext}").read_bytes()
            b = Path(f"{outputs['megamath']}{ext}").read_bytes()
            verdict = first_difference(a, b)
            failures += verdict != "identical"
            print(f"{kind:26s} {ext}  {len(a):>12,} bytes  {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
