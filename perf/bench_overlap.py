"""Train/test overlap throughput: `megamath overlap` against the reference tool's algorithm in plain Python.

    python perf/bench_overlap.py --corpus ../shared/data/proof-pile-2-sample \
        --test ../shared/data/eval/gsm8k_test.jsonl --field question --n 30 --workers 1 2

Both run in this process on the same input: the corpus files in the same order, plus a small file of
`--planted` documents that each embed one test item in text taken from the corpus, so that the hit
comparison is not between two empty lists. Rows:
  * reading alone (zstd decompression and cutting lines, one core) and reading + JSON parsing: the floors
    any scanner over these files pays (MB/s are of document text everywhere, the JSON around it not counted);
  * the n-gram scan alone on the extracted text, C++ (`_helpers.scan_candidates`) against numpy
    (`megamath.overlap.numpy_scan`), CPU seconds, `hits` = candidate n-grams, which must be the same;
  * megamath overlap with each worker count: wall time including starting the workers;
  * the plain-Python reference (`megamath.overlap.reference.overlap_ref`: a set of n-gram strings per
    document intersected with each test item's set), reading and parsing the same way, one core.
The hits must be identical (same documents, test items, fields, n and distinct matching n-grams) and the
ratio is reference seconds over megamath's 1-worker seconds: per core (`cpu_ratio`: the same with this
process's CPU seconds, steadier than wall time on a machine other jobs share). The projection for ProofPile II
takes the 1-worker rate times the cores of the node (workers read their own files, so nothing is serial
but the verification of candidates), for `--tokens` tokens at `--bytes-per-token` bytes of text each.
Results are printed and appended to `perf/results/overlap-YYYY-MM-DD.md`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _machine() -> str:
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}{load}"


def _documents(corpus: list[Path]):
    """(file, line, text) of every valid corpus record, in the order megamath overlap reads them."""
    from megamath.data.sources import discover_inputs, parse_lines, read_line_batches

    for g, group in enumerate(discover_inputs(corpus)):
        for path in group.files:
            for batch in read_line_batches(path, g, 1 << 20):
                texts, bad = parse_lines(batch.data, "text")
                bad_lines = {offset for offset, _, _ in bad}
                lines = [i for i in range(len(texts) + len(bad)) if i not in bad_lines]
                for line, text in zip(lines, texts):
                    yield str(path), batch.first_line + line, text


def _plant(corpus: list[Path], tests: list[str], count: int, folder: Path, seed: int) -> Path:
    """`count` documents, each a test item between two slices of corpus text."""
    rng = random.Random(seed)
    docs = []
    for i, (_, _, text) in enumerate(_documents(corpus)):
        if i >= 4 * count:
            break
        docs.append(text.split())
    path = folder / "planted.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for k in range(count):
            words = rng.choice(docs)
            cut = rng.randrange(len(words) + 1)
            text = " ".join(words[:cut][-200:]) + "\n" + rng.choice(tests) + "\n" + " ".join(words[cut:][:200])
            f.write(json.dumps({"text": text, "meta": {"planted": k}}) + "\n")
    return path


def _read_floor(corpus: list[Path], parse: bool) -> tuple[float, int]:
    from megamath.data.sources import discover_inputs, parse_lines, read_line_batches

    start, size = time.perf_counter(), 0
    for g, group in enumerate(discover_inputs(corpus)):
        for path in group.files:
            for batch in read_line_batches(path, g, 1 << 20):
                if parse:
                    size += sum(len(t.encode("utf-8", "surrogatepass")) for t in parse_lines(batch.data, "text")[0])
    return time.perf_counter() - start, size


def _scan_stage(corpus: list[Path], test_texts: list[str], ns: list[int]) -> list[dict]:
    """The n-gram scan alone, C++ against numpy, on the same extracted text: CPU seconds, same spans."""
    import numpy as np

    from megamath import _helpers
    from megamath.data.sources import discover_inputs, read_line_batches
    from megamath.overlap.ngrams import encode_texts
    from megamath.overlap.numpy_scan import NumpyScanner

    ns_array = np.asarray(ns, dtype=np.int64)
    test_buf, test_offsets = encode_texts(test_texts)
    table = _helpers.build_key_table(np.unique(_helpers.ngram_keys(test_buf, test_offsets, ns_array)[0]))
    numpy_scanner = NumpyScanner()
    numpy_keys = numpy_scanner.keys_of(test_buf, test_offsets, ns_array)
    buffers = []
    for g, group in enumerate(discover_inputs(corpus)):
        for path in group.files:
            for batch in read_line_batches(path, g, 1 << 20):
                ok, buf, offsets = _helpers.extract_json_field(batch.data, "text")
                if ok:
                    buffers.append((buf, offsets))
    size = sum(len(buf) for buf, _ in buffers)
    rows, found = [], {}
    for name, scan in (("scan stage alone: C++ rolling hash", lambda b, o: _helpers.scan_candidates(b, o, ns_array, table)),
                       ("scan stage alone: numpy vectorised", lambda b, o: numpy_scanner.scan(b, o, ns_array, numpy_keys))):
        cpu = time.process_time()
        found[name] = [tuple(map(tuple, scan(buf, offsets))) for buf, offsets in buffers]
        cpu = time.process_time() - cpu
        rows.append({"implementation": name, "workers": 1, "cpu_seconds": round(cpu, 3), "text_MB": round(size / 1e6, 1),
                     "MB_per_s": round(size / cpu / 1e6, 1), "hits": sum(len(f[0]) for f in found[name])})
    rows[1]["identical_hits"] = found[rows[0]["implementation"]] == found[rows[1]["implementation"]]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--field", action="append", dest="fields", default=None)
    parser.add_argument("--n", type=int, action="append", dest="ns", default=None)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--planted", type=int, default=20, help="documents embedding a test item (0: none)")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain-Python run")
    parser.add_argument("--tokens", type=float, default=55e9, help="ProofPile II tokens, for the projection")
    parser.add_argument("--bytes-per-token", type=float, default=2.58,
                        help="text bytes per token (2.58: the shared sample's text bytes over its tokens "
                        "with a 32k Llama-family tokenizer)")
    parser.add_argument("--node-cores", type=int, default=64)
    args = parser.parse_args(argv)
    fields, ns = args.fields or ["question"], sorted(set(args.ns or [30]))

    from megamath.overlap import load_test_items, overlap_ref
    from megamath.overlap.run import OverlapConfig, overlap

    items = load_test_items(args.test, fields)
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = list(args.corpus)
        if args.planted:
            corpus.append(_plant(args.corpus, [item.texts[0] for item in items], args.planted, tmp, seed=0))
        parse_seconds, text_bytes = _read_floor(corpus, parse=True)
        read_seconds, _ = _read_floor(corpus, parse=False)
        for name, seconds in (("reading (decompress, cut lines)", read_seconds), ("reading + JSON parsing", parse_seconds)):
            rows.append({"implementation": name, "workers": 1, "seconds": round(seconds, 2),
                         "text_MB": round(text_bytes / 1e6, 1), "MB_per_s": round(text_bytes / seconds / 1e6, 1)})
        rows += _scan_stage(corpus, [text for item in items for text in item.texts], ns)
        for workers in args.workers:
            out = tmp / f"hits-{workers}.jsonl"
            start, cpu = time.perf_counter(), time.process_time()
            summary = overlap(OverlapConfig(args.test, fields, corpus, out, ns=ns, workers=workers, progress=False))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            hits = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            runs[workers] = (seconds, hits, out.read_bytes())
            rows.append({"implementation": "megamath overlap", "workers": workers, "seconds": round(seconds, 2),
                         "cpu_seconds": round(cpu, 3) if workers == 1 else "",
                         "documents": summary.documents, "text_MB": round(summary.text_bytes / 1e6, 1),
                         "MB_per_s": round(summary.text_bytes / seconds / 1e6, 1), "hits": len(hits),
                         "same_output_as_1_worker": runs[workers][2] == runs[args.workers[0]][2]})
        ours_1 = runs[1][0] if 1 in runs else None  # the per-core ratio needs a 1-worker run
        ours_1_cpu = next((r["cpu_seconds"] for r in rows if r["implementation"] == "megamath overlap"
                           and r["workers"] == 1), None)
        if not args.no_reference:
            start, cpu = time.perf_counter(), time.process_time()
            where, texts = [], []
            for file, line, text in _documents(corpus):
                where.append((file, line))
                texts.append(text)
            ref = overlap_ref([item.texts for item in items], texts, ns)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
            ours = {(h["file"], h["line"], str(h["test_id"]), h["field"], h["n"], h["matching_ngrams"]) for h in runs[min(runs)][1]}
            theirs = {(*where[d], str(items[i].id), fields[f], n, len(grams)) for d, i, f, n, grams in ref}
            rows.append({"implementation": "plain Python (reference algorithm)", "workers": 1,
                         "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 3), "documents": len(texts),
                         "text_MB": round(size / 1e6, 1), "MB_per_s": round(size / seconds / 1e6, 2), "hits": len(ref),
                         "identical_hits": ours == theirs, "ratio": round(seconds / ours_1, 1) if ours_1 else "",
                         "cpu_ratio": round(cpu / ours_1_cpu, 1) if ours_1_cpu else ""})
            if ours != theirs:
                print(f"hits differ: only megamath {sorted(ours - theirs)[:5]}, only reference {sorted(theirs - ours)[:5]}")
    first = next(r for r in rows if r["implementation"] == "megamath overlap")
    per_core = first["MB_per_s"] / first["workers"]
    total_bytes = args.tokens * args.bytes_per_token
    minutes = lambda rate: total_bytes / (rate * 1e6 * args.node_cores) / 60  # noqa: E731
    projection = (f"ProofPile II: {args.tokens / 1e9:.0f}B tokens x {args.bytes_per_token} bytes/token = "
                  f"{total_bytes / 1e9:,.0f} GB of text. On {args.node_cores} cores at this run's "
                  f"{per_core:.1f} MB/s per core (wall): {minutes(per_core):,.1f} min")
    if first.get("cpu_seconds"):
        cpu_rate = first["text_MB"] / first["cpu_seconds"]
        projection += f"; at {cpu_rate:.1f} MB/s per CPU-second (a core to itself): {minutes(cpu_rate):,.1f} min"
    ref_row = next((r for r in rows if r["implementation"].startswith("plain")), None)
    if ref_row:
        projection += (f". The plain-Python algorithm at {ref_row['MB_per_s']} MB/s per core: "
                       f"{minutes(ref_row['MB_per_s']) / 60:,.1f} h")
    projection += ". Reading the compressed files from disk is not included."
    keys = ["implementation", "workers", "seconds", "cpu_seconds", "documents", "text_MB", "MB_per_s", "hits",
            "same_output_as_1_worker", "identical_hits", "ratio", "cpu_ratio"]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(f"{r[k]:,}" if type(r.get(k)) is int else str(r.get(k, "")) for k in keys) + " |"
              for r in rows]
    title = f"overlap — {datetime.date.today().isoformat()} — {_machine()}"
    setup = (f"test: {args.test.name} ({len(items):,} items, fields {', '.join(fields)}), n = {', '.join(map(str, ns))}, "
             f"corpus: {', '.join(p.name for p in args.corpus)} + {args.planted} planted documents")
    report = f"## {title}\n\n{setup}\n\n" + "\n".join(table) + f"\n\n{projection}\n"
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"overlap-{datetime.date.today().isoformat()}.md", "a") as f:
        f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
