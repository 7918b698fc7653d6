"""Data-path benchmarks: preprocessing throughput, and index building at ProofPile II scale.

    python perf/bench_data.py preprocess --input ../shared/data/proof-pile-2-sample \
        --tokenizer-model ../shared/tokenizers/llama-family-32k.model --workers 1 2 \
        [--megatron-lm PATH_TO_MEGATRON_LM_CHECKOUT]
    python perf/bench_data.py index [--documents 10000000 --tokens 55e9 --seq-length 4096]

Preprocessing runs `megamath preprocess` in a subprocess per worker count (so the peak memory is that
run's own) and reports documents/s, tokens/s and input MB/s (uncompressed). The peer, Megatron-LM's
`tools/preprocess_data.py`, runs on the same records and tokenizer when a checkout is given; it reads
uncompressed jsonl only, so both get the same decompressed file. Without a checkout it is reported absent.

Index building times what a training launch waits for: the GPT sample index (document shuffle, sample
index, sample shuffle) of one synthetic dataset of the given size, and the blending indices of Llemma's
mixture over 5 datasets. Megatron-core's compiled helpers run on the same arrays when importable.
Results are printed and written to `perf/results/data-YYYY-MM-DD.md`.
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Llemma's data mixture: ProofPile II subsets 2:4:1 plus general data (Pile, RedPajama code).
LLEMMA_MIXTURE = {
    "arxiv": 2.0,
    "open-web-math": 4.0,
    "algebraic-stack": 1.0,
    "pile": 0.147368,
    "redpajama-code": 0.221053,
}


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


# --- preprocessing -----------------------------------------------------------------------------------

def _jsonl_inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.name.endswith((".jsonl", ".jsonl.zst", ".jsonl.gz")))
        else:
            files.append(path)
    if not files:
        raise SystemExit(f"no .jsonl[.zst|.gz] files under {', '.join(map(str, paths))}")
    return files


def _decompress_to(files: list[Path], target: Path) -> tuple[int, int]:
    """Concatenate the records of `files` into one plain jsonl; return (records, bytes)."""
    import gzip

    import zstandard

    records = 0
    with open(target, "wb") as out:
        for path in files:
            if path.name.endswith(".zst"):
                with open(path, "rb") as f:
                    data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
            elif path.name.endswith(".gz"):
                data = gzip.decompress(path.read_bytes())
            else:
                data = path.read_bytes()
            for line in data.splitlines(keepends=False):
                if line.strip():
                    out.write(line + b"\n")
                    records += 1
    return records, target.stat().st_size


def _count_tokens(output_dir: Path) -> tuple[int, int]:
    from megamath.data.indexed_dataset import IndexedDataset

    documents = tokens = 0
    for idx in output_dir.glob("*.idx"):
        dataset = IndexedDataset(idx.with_suffix(""))
        documents += dataset.num_documents
        tokens += dataset.num_tokens
    return documents, tokens


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd; return (seconds, peak RSS MiB of the largest process it ran: itself or a worker it waited
    for, from wait4's usage of this one child, so earlier runs' peaks never carry over)."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, cmd)
    return seconds, usage.ru_maxrss / 1024


def bench_preprocess(args) -> list[dict]:
    """Each tool and worker count `--repeats` times, interleaved (a change in the machine's load reaches
    every tool alike); rows give the median time and, for the peer, its ratio to megamath on the same file."""
    files = _jsonl_inputs(args.input)
    megatron = args.megatron_lm / "tools" / "preprocess_data.py" if args.megatron_lm else None
    peer_env = dict(os.environ, PYTHONPATH=f"{args.megatron_lm}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory(prefix="megamath-bench-") as tmp:
        tmp = Path(tmp)
        plain = tmp / "input.jsonl"
        records, plain_bytes = _decompress_to(files, plain)
        print(f"input: {len(files)} files, {records:,} records, {plain_bytes / 1e6:.1f} MB uncompressed")

        def ours(inputs, workers):
            return lambda out: ([sys.executable, "-m", "megamath.cli", "preprocess", "--input", *inputs,
                                 "--tokenizer-model", str(args.tokenizer_model), "--output-dir", str(out),
                                 "--workers", str(workers)], None, out / f"{plain.stem}_text_document")

        def theirs(workers):
            # GPTSentencePieceTokenizer: encode(text) + EOS in every Megatron-LM version, as megamath stores
            # it (the older SentencePieceTokenizer appended an added <EOD> id instead of EOS).
            return lambda out: ([sys.executable, str(megatron), "--input", str(plain), "--output-prefix",
                                 str(out / "doc"), "--tokenizer-type", "GPTSentencePieceTokenizer",
                                 "--tokenizer-model", str(args.tokenizer_model), "--workers", str(workers),
                                 "--append-eod", "--json-keys", "text"], peer_env, out / "doc_text_document")

        runs = [("megamath", w, ours([str(p) for p in args.input], w)) for w in args.workers]
        runs += [("megamath (plain jsonl)", w, ours([str(plain)], w)) for w in args.workers]
        if megatron is not None and megatron.exists():
            runs += [(PEER, w, theirs(w)) for w in args.workers]
        seconds = {(name, w): [] for name, w, _ in runs}
        counts, peaks, outputs = {}, {}, {}
        for repeat in range(args.repeats):
            for name, workers, build in runs:
                out = tmp / f"out-{len(outputs)}-{repeat}"
                out.mkdir()
                cmd, env, prefix = build(out)
                elapsed, peak = _timed(cmd, env)
                seconds[name, workers].append(elapsed)
                peaks[name, workers] = max(peak, peaks.get((name, workers), 0.0))
                if repeat == 0:  # the outputs are the same every time: count and compare the first
                    counts[name, workers] = _count_tokens(out)
                    outputs[name, workers] = prefix
                else:
                    shutil.rmtree(out)
        rows = []
        for name, workers, _ in runs:
            median = statistics.median(seconds[name, workers])
            rows.append(_preprocess_row(name, workers, median, *counts[name, workers], plain_bytes,
                                        peaks[name, workers]))
            if name == PEER:
                ref = outputs["megamath (plain jsonl)", workers]
                rows[-1]["seconds_vs_megamath"] = round(median / statistics.median(
                    seconds["megamath (plain jsonl)", workers]), 2)
                rows[-1]["byte_identical_to_megamath"] = all(
                    filecmp.cmp(f"{outputs[name, workers]}{ext}", f"{ref}{ext}", shallow=False)
                    for ext in (".bin", ".idx"))
        if megatron is None or not megatron.exists():
            rows += [{"tool": PEER, "workers": w, "status": "absent"} for w in args.workers]
    return rows


PEER = "Megatron-LM tools/preprocess_data.py"


def _preprocess_row(tool, workers, seconds, documents, tokens, input_bytes, peak_mib) -> dict:
    return {"tool": tool, "workers": workers, "seconds (median)": round(seconds, 2), "documents": documents,
            "tokens": tokens, "docs_per_s": round(documents / seconds), "tokens_per_s": round(tokens / seconds),
            "MB_per_s": round(input_bytes / 1e6 / seconds, 2), "peak_rss_MiB": round(peak_mib)}


# --- index building ----------------------------------------------------------------------------------

def _synthetic_sizes(documents: int, tokens: int, seed: int) -> np.ndarray:
    """Log-normal document lengths (as real corpora have), scaled so they sum to `tokens` exactly."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=documents)
    sizes = np.maximum(1, np.floor(raw * (tokens / raw.sum()))).astype(np.int64)
    sizes[: tokens - int(sizes.sum())] += 1  # hand out the rounding remainder
    assert int(sizes.sum()) == tokens and sizes.max() < 2**31
    return sizes.astype(np.int32)


def _seconds(fn, repeats: int = 1):
    """(median seconds of `repeats` calls of fn, the last call's result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _megatron_helpers():
    try:
        from megatron.core.datasets import helpers, helpers_cpp  # the peer's compiled helpers
    except Exception:  # noqa: BLE001 - any failure means the peer is not usable here
        return None
    return helpers, helpers_cpp


def bench_index(args) -> list[dict]:
    from megamath.data.blending import build_blending_indices, normalize_weights
    from megamath.data.sample_index import (build_doc_idx, build_gpt_indices, build_sample_index,
                                            num_epochs_needed, samples_in)

    tokens = int(args.tokens)
    sizes = _synthetic_sizes(args.documents, tokens, args.seed)
    documents = np.arange(args.documents, dtype=np.int64)
    num_samples = samples_in(tokens, args.seq_length)  # one epoch
    print(f"synthetic dataset: {args.documents:,} documents, {tokens:,} tokens, "
          f"seq {args.seq_length}, {num_samples:,} samples")
    rows = []
    seconds, _ = _seconds(lambda: build_gpt_indices(sizes, documents, num_samples, args.seq_length, args.seed),
                          args.repeats)
    rows.append({"step": "GPT indices (doc + sample + shuffle), megamath", "items": num_samples,
                 "seconds (median)": round(seconds, 3)})
    doc_idx = build_doc_idx(documents, num_epochs_needed(tokens, args.seq_length, num_samples),
                            np.random.RandomState(args.seed))
    seconds, ours = _seconds(lambda: build_sample_index(sizes, doc_idx, args.seq_length, num_samples), args.repeats)
    rows.append({"step": "sample index alone, megamath (C++)", "items": num_samples,
                 "seconds (median)": round(seconds, 3)})

    weights = normalize_weights(list(LLEMMA_MIXTURE.values()))
    seconds, (dataset_index, _) = _seconds(lambda: build_blending_indices(weights, num_samples), args.repeats)
    shares = np.bincount(dataset_index, minlength=len(weights)) / num_samples
    worst = float(np.max(np.abs(shares - weights) / weights))
    rows.append({"step": "blending indices, Llemma mixture of 5, megamath (C++)", "items": num_samples,
                 "seconds (median)": round(seconds, 3), "worst_relative_share_error": f"{worst:.2e}"})

    peer = _megatron_helpers()
    if peer is None:
        rows.append({"step": "Megatron-core helpers_cpp (sample index, blending)", "status": "absent"})
    else:
        doc_idx32 = doc_idx.astype(np.int32)
        helpers, helpers_cpp = peer
        seconds, theirs = _seconds(lambda: helpers.build_sample_idx(
            sizes, doc_idx32, args.seq_length, 1, tokens, True, True), args.repeats)
        same = bool(np.array_equal(np.asarray(theirs)[: num_samples + 1], ours[: num_samples + 1]))
        rows.append({"step": "sample index alone, Megatron-core helpers_cpp", "items": num_samples,
                     "seconds (median)": round(seconds, 3), "equal_to_megamath": same})
        index = np.zeros(num_samples, dtype=np.int16)
        sample = np.zeros(num_samples, dtype=np.int64)
        seconds, _ = _seconds(lambda: helpers_cpp.build_blending_indices(
            index, sample, weights, len(weights), num_samples, False), args.repeats)
        rows.append({"step": "blending indices, Megatron-core helpers_cpp", "items": num_samples,
                     "seconds (median)": round(seconds, 3),
                     "equal_to_megamath": bool(np.array_equal(index, dataset_index)),
                     "note": "peer picks argmax w*max(i,1)-count, megamath w*(i+1)-count (the peer gives "
                             "a 1e-9-weight dataset a sample at i=2)"})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append({"step": "peak RSS of this process", "MiB": round(peak)})
    return rows


# --- report ------------------------------------------------------------------------------------------

def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:,}" if type(row.get(k)) is int else str(row.get(k, ""))
                                       for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("preprocess", help="preprocessing throughput per worker count")
    pre.add_argument("--input", nargs="+", type=Path, required=True)
    pre.add_argument("--tokenizer-model", type=Path, required=True)
    pre.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    pre.add_argument("--megatron-lm", type=Path, default=None, help="a Megatron-LM checkout: the peer")
    pre.add_argument("--repeats", type=int, default=3, help="runs of each tool and worker count (median)")
    idx = sub.add_parser("index", help="sample index and blending indices at ProofPile II scale")
    idx.add_argument("--documents", type=int, default=10_000_000)
    idx.add_argument("--tokens", type=float, default=55e9)
    idx.add_argument("--seq-length", type=int, default=4096)
    idx.add_argument("--seed", type=int, default=1234)
    idx.add_argument("--repeats", type=int, default=5, help="calls of each step (median)")
    args = parser.parse_args(argv)

    rows = bench_preprocess(args) if args.what == "preprocess" else bench_index(args)
    title = f"{args.what} — {datetime.date.today().isoformat()} — {_machine()}"
    report = f"## {title}\n\n{_table(rows)}\n"
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"data-{datetime.date.today().isoformat()}.md", "a") as f:
        f.write(report + "\n")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
