"""`megamath overlap`: scan a corpus for the n-grams of a test set and write one line per hit.

The corpus inputs are those of `megamath preprocess` (`megamath.data.sources`): a ProofPile II root,
subset or split folders, `.jsonl[.zst|.gz]` files or globs. Workers read files in ~1 MB batches of
lines and find candidate n-grams (`scan.py`, `pool.py`); the main process verifies each candidate's
real n-gram against the test n-grams, then writes the hits in corpus order: the output is identical for
any worker count. Hits go to a temporary file published on success (an interrupted run
leaves no output that looks complete); the summary is written beside it (`summary_path`). A second run on
the same output is refused while the first holds its lock (`output_lock`).

A hit line is one (test item, field, n, corpus document):
    {"test_id", "field", "n", "ngram" (the first matching n-gram in the document), "offset" (its character
     offset in the document text), "matching_ngrams" (distinct test n-grams found in the document),
     "file", "line" (1-based), "subset", "split", "meta" (the record's meta)}
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from megamath.atomic_io import replace_atomically, write_text_atomically
from megamath.data.sources import BadLine, InputGroup, discover_inputs
from megamath.overlap.ngrams import TestIndex, load_test_items
from megamath.overlap.pool import map_files
from megamath.overlap.scan import ScanResult, ScanSpec, scan_file
from megamath.overlap.summary import OverlapSummary
from megamath.output_path import prepare_output_file
from megamath.run_lock import FileLock

INT64_MAX = 2**63 - 1


@dataclass
class OverlapConfig:
    """Options of one overlap run (the flags of `megamath overlap`)."""

    test: str | Path
    """jsonl test file, one record per test item."""
    fields: Sequence[str]
    """Record fields whose n-grams are checked (GSM8K: question, answer; MATH: problem, solution)."""
    corpus: Sequence[str | Path]
    """ProofPile II root, subset or split folders, files or globs of .jsonl, .jsonl.zst, .jsonl.gz."""
    output: str | Path
    """HITS.jsonl; the summary goes beside it (`summary_path`)."""
    ns: Sequence[int] = (30,)
    """N-gram lengths in words (LLEMMA: 30)."""
    workers: int = 1
    """Worker processes that scan; 1 runs everything in this process."""
    json_key: str = "text"
    """Corpus record field holding the document text."""
    id_field: str = "id"
    """Test record field holding the item id (`id` also takes `unique_id`, MATH-500's); without it, the
    record's 0-based position."""
    batch_bytes: int = 1 << 20
    """Decompressed bytes of whole lines per batch sent to a worker."""
    report_bad_lines: int = 5
    """Skipped corpus lines printed per reason; all are counted."""
    progress: bool = True

    def __post_init__(self) -> None:
        self.fields = tuple(dict.fromkeys(self.fields))  # a field given twice is checked once, as an n is
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if any(int(n) < 1 for n in self.ns):
            raise ValueError(f"--n must be at least 1, got {min(self.ns)}")
        if any(int(n) > INT64_MAX for n in self.ns):  # the scan holds n in int64
            raise ValueError(f"--n must be at most {INT64_MAX}, got {max(self.ns)}")
        if not self.json_key:
            raise ValueError("--json-key must not be empty")


def output_lock(output: str | Path) -> FileLock:
    """One overlap run per summary: `.HITS.summary.json.lock` beside it. Keyed by the summary, not the hits
    file, because `--output hits` and `--output hits.jsonl` write different hits files but one summary."""
    summary = summary_path(output)
    return FileLock(summary.with_name(f".{summary.name}.lock"), "overlap run", output, "another --output")


def summary_path(output: str | Path) -> Path:
    """`HITS.jsonl` -> `HITS.summary.json` (any other name: the name plus `.summary.json`)."""
    output = Path(output)
    stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.summary.json")


@dataclass
class _Hit:
    offset: int
    ngram: str
    distinct: set[str] = field(default_factory=set)


def verify(index: TestIndex, result: ScanResult) -> dict[tuple[int, int, int, int], _Hit]:
    """Candidates -> hits keyed (line offset, item, field, j), sorted; a candidate whose text is no test
    n-gram (a key collision) is dropped here."""
    hits: dict[tuple[int, int, int, int], _Hit] = {}
    for cand in result.candidates:  # in document, n, position order: the first seen is the earliest
        for item, fld in index.match(cand.j, cand.ngram):
            hit = hits.setdefault((cand.line, item, fld, cand.j), _Hit(cand.offset, cand.ngram))
            hit.distinct.add(cand.ngram)
    return dict(sorted(hits.items()))


def overlap(config: OverlapConfig, log=None) -> OverlapSummary:
    """Run the scan, write HITS.jsonl and its summary, return the summary.

    Workers are spawned, so a script calling this with `workers > 1` needs the usual
    `if __name__ == "__main__":` guard; the CLI has it.
    """
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    items = load_test_items(config.test, config.fields, config.id_field)
    index = TestIndex.build(items, config.fields, config.ns)
    groups = discover_inputs(config.corpus)
    output = Path(config.output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; name the HITS.jsonl file")
    inputs = [config.test, *(path for group in groups for path in group.files)]
    prepare_output_file(output, inputs=inputs)
    # The summary is written after the hits are published: check its path now, not after the scan.
    prepare_output_file(summary_path(output), flag="--output's summary", inputs=inputs)
    # One run per output, held from the scan to the summary: two runs on one HITS.jsonl left one's summary
    # beside the other's hits. Other outputs in the folder stay free; a device or pipe output is not locked.
    held = output_lock(output) if output.is_file() or not output.exists() else contextlib.nullcontext()
    with held:
        return _scan(config, index, groups, output, log)


def _scan(config: OverlapConfig, index: TestIndex, groups: list, output: Path, log) -> OverlapSummary:
    """The scan into `output` and its summary beside it, under the output's lock."""
    summary = OverlapSummary.start(config, index, groups)
    spec = ScanSpec(config.json_key, np.asarray(index.ns, dtype=np.int64), index.table, config.batch_bytes)
    files = [(path, g) for g, group in enumerate(groups) for path in group.files]
    total_bytes = sum(path.stat().st_size for group in groups for path in group.files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="overlap", file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    start = time.perf_counter()

    def scan_into(f) -> None:
        results = map_files(scan_file, spec, files, config.workers)
        try:
            for result in results:
                group = groups[result.group]
                _count_bad(summary, result, config.report_bad_lines, log)
                hits = verify(index, result)
                for (line, item, fld, j), hit in hits.items():
                    f.write(_hit_line(index, result, group, line, item, fld, j, hit))
                summary.add_batch(group, result, hits)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{summary.text_bytes / elapsed / 1e6:.1f} MB/s, "
                                    f"{summary.documents / elapsed:,.0f} docs/s, {summary.hit_lines:,} hits",
                                    refresh=False)
                bar.update(result.file_bytes)
            summary.check_scanned(config.json_key)  # before the hits are published
        finally:
            results.close()  # stops the workers if the scan failed here

    try:
        replace_atomically(output, scan_into)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    write_text_atomically(summary_path(output), json.dumps(summary.to_json(), indent=1, ensure_ascii=False) + "\n")
    return summary


def _count_bad(summary: OverlapSummary, result: ScanResult, report: int, log) -> None:
    for offset, reason, detail in result.bad:
        count = summary.skipped.get(reason, 0) + 1
        summary.skipped[reason] = count
        if count <= report:
            log(f"skipped {BadLine(result.file, result.first_line + offset, reason, detail)}")


def _hit_line(index: TestIndex, result: ScanResult, group: InputGroup, line: int, item: int, fld: int, j: int,
              hit: _Hit) -> bytes:
    record = {
        "test_id": index.items[item].id,
        "field": index.fields[fld],
        "n": index.ns[j],
        "ngram": hit.ngram,
        "offset": hit.offset,
        "matching_ngrams": len(hit.distinct),
        "file": str(result.file),
        "line": result.first_line + line,
        "subset": group.subset or group.name,
        "split": group.split,
        "meta": result.meta[line],
    }
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
