"""`megamath preprocess`: ProofPile II jsonl(.zst/.gz) -> Megatron `.bin`/`.idx`, streaming, N workers.

Output naming (see `sources.py`): files under `<subset>/<split>/` (split: train, validation, test) make
`DIR/{subset}_{split}_{json_key}_document`; any other file makes `DIR/{file stem}_{json_key}_document`.

Why not Megatron-LM's `tools/preprocess_data.py`: it sends one line at a time through `Pool.imap`,
whose feeder thread reads the whole input with no backpressure (its known out-of-memory failure), and
pays Python overhead per document on both sides of the pipe (a list of ints pickled per document).
Here the main process decompresses and cuts the input into ~1 MB batches of raw lines; each worker
parses, validates and tokenizes a whole batch at once and returns one flat token array in the final
dtype. At most `2 * workers` batches are in flight, so memory is bounded whatever the input size, and
results are written in input order, so the output is byte-identical for any worker count.

A dataset is published (atomically, by the writer) when its last file is done; any exception, a
`--strict` bad line or Ctrl-C aborts the dataset being written, so no output looks complete unless it is.
Datasets finished before a failure stay published (hours of work on a large corpus), and are named.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megamath.data.indexed_dataset import best_dtype
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter, remove_dead_writers_temporaries
from megamath.data.preprocess_workers import Encoded, EncoderSpec, InProcess, ProcessPool
from megamath.data.sources import (BadLine, InputGroup, LineBatch, archive_fault, discover_inputs, read_line_batches,
                                   skipped_counts)
from megamath.data.tokenizer import SentencePieceTokenizer
from megamath.run_lock import FolderLock

# Temporary names of IndexedDatasetWriter (`{prefix}.bin.tmp-{pid}-{n}`), removed when their run is dead.


def default_workers() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. in containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class PreprocessConfig:
    """Options of one preprocessing run (the flags of `megamath preprocess`)."""

    inputs: Sequence[str | Path]
    """ProofPile II root, subset or split folders, files or globs of .jsonl, .jsonl.zst, .jsonl.gz."""
    tokenizer_model: str | Path
    """A SentencePiece `tokenizer.model` (Llama family)."""
    output_dir: str | Path
    """Where `{name}_{json_key}_document.{bin,idx}` are written; created if missing."""
    workers: int = field(default_factory=default_workers)
    """Worker processes that parse and tokenize; 1 runs everything in this process."""
    json_key: str = "text"
    """The record field holding the document text."""
    append_eod: bool = True
    """Append the tokenizer's EOS id after every document (Megatron's --append-eod)."""
    strict: bool = False
    """Fail on the first bad line (ValueError naming file:line) instead of skipping and counting it."""
    skip_bad_files: bool = False
    """Skip (with a warning) compressed inputs that are empty or cannot be decompressed to their end,
    checked by a test pass before reading; by default such a file is an error."""
    batch_bytes: int = 1 << 20
    """Decompressed bytes of whole lines per batch sent to a worker (a few hundred documents)."""
    report_bad_lines: int = 5
    """Bad lines printed (and kept in the summary) per reason and dataset; all are counted."""
    progress: bool = True
    """Show a progress bar on stderr."""
    sentence_lists: bool = False
    """Read a list of strings under json_key as one document of several sequences, a sentence each, as
    Megatron's preprocess_data.py does (its --split-sentences writes such lists); tools/preprocess_data.py
    sets it. Off, such a line is skipped (text not a string): `megamath preprocess` stores one sequence per
    document."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes must be at least 1, got {self.batch_bytes}")
        if not self.json_key:
            raise ValueError("--json-key must not be empty")
        if "/" in self.json_key or "\\" in self.json_key or "\0" in self.json_key:
            raise ValueError(f"--json-key {self.json_key!r} would name datasets outside --output-dir (it is part "
                             "of the file name): use a key without path separators")
        if self.json_key in (".", ".."):  # `a..b` is a plain name; only a whole `.` or `..` names a folder
            raise ValueError(f"--json-key {self.json_key!r} is a folder's name, not a usable key (it is part of "
                             "the file name): use another key")


@dataclass
class DatasetSummary:
    """What one output dataset received."""

    name: str
    """Output file name without extension, e.g. `arxiv_train_text_document`."""
    prefix: Path
    files: int
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    """Decompressed JSONL bytes read."""
    output_bytes: int = 0
    """Size of the `.bin` plus the `.idx`."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped lines per reason."""
    bad_lines: list[BadLine] = field(default_factory=list)
    """The first `report_bad_lines` skipped lines per reason."""
    seconds: float = 0.0
    """Wall time from the previous dataset's completion (or the start) to this one's."""


# --- output side (main process; the workers are in preprocess_workers.py) ---------------------------


class _Outputs:
    """Writers and summaries of the output datasets, fed batches in input order (group by group)."""

    def __init__(self, groups: list[InputGroup], config: PreprocessConfig, dtype: np.dtype, log) -> None:
        self.config, self.dtype, self.log = config, dtype, log
        prefixes = [g.output_prefix(config.output_dir, config.json_key) for g in groups]
        inputs = [len(g.files) if g.origins is None else len({source for source, _, _ in g.origins}) for g in groups]
        self.summaries = [DatasetSummary(prefix.name, prefix, n) for n, prefix in zip(inputs, prefixes)]
        self._writers: dict[int, IndexedDatasetWriter] = {}
        self._next_to_finish = 0
        self._clock = time.perf_counter()

    def add(self, batch: LineBatch, encoded: Encoded) -> None:
        self._finish_before(batch.group)
        summary = self.summaries[batch.group]
        for offset, reason, detail in encoded.bad:
            bad = BadLine(batch.file, batch.first_line + offset * batch.line_step, reason, detail)
            if self.config.strict:
                raise ValueError(f"{bad} (strict mode stops at the first bad line)")
            count = summary.skipped.get(reason, 0) + 1
            summary.skipped[reason] = count
            if count <= self.config.report_bad_lines:
                summary.bad_lines.append(bad)
                self.log(f"skipped {bad}")
        self._writer(batch.group).add_documents(encoded.tokens, encoded.lengths, encoded.sequences)
        summary.documents += encoded.documents
        summary.tokens += len(encoded.tokens)
        summary.input_bytes += encoded.input_bytes

    def _writer(self, group: int) -> IndexedDatasetWriter:
        if group not in self._writers:
            self._writers[group] = IndexedDatasetWriter(self.summaries[group].prefix, self.dtype)
        return self._writers[group]

    def _finish_before(self, group: int) -> None:
        """Publish every dataset before `group` (empty inputs give empty datasets)."""
        while self._next_to_finish < group:
            index = self._next_to_finish
            summary = self.summaries[index]
            if summary.skipped and not summary.documents:  # e.g. a wrong --json-key: an empty dataset is no result
                raise ValueError(f"{summary.name}: every line was skipped ({skipped_counts(summary.skipped)}; first: {summary.bad_lines[0]}); "
                                 "nothing written for it: check --json-key and the input")
            self._writer(index).finalize()
            del self._writers[index]
            now = time.perf_counter()
            summary.output_bytes = sum(os.path.getsize(f"{summary.prefix}{ext}") for ext in (".bin", ".idx"))
            summary.seconds, self._clock = now - self._clock, now
            self._next_to_finish += 1

    @property
    def published(self) -> list[str]:
        """The datasets already finished and renamed into place."""
        return [summary.name for summary in self.summaries[:self._next_to_finish]]

    def finish(self) -> list[DatasetSummary]:
        self._finish_before(len(self.summaries))
        return self.summaries

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()


# --- the run ----------------------------------------------------------------------------------------


def _line_batches(groups: list[InputGroup], batch_bytes: int) -> Iterator[LineBatch]:
    for index, group in enumerate(groups):
        for k, path in enumerate(group.files):
            if group.origins is None:
                yield from read_line_batches(path, index, batch_bytes)
                continue
            source, first, step = group.origins[k]  # a copy of every step-th line of `source`: name those
            for batch in read_line_batches(path, index, batch_bytes):
                yield dataclasses.replace(batch, file=source, first_line=first + (batch.first_line - 1) * step,
                                          line_step=step)


def preprocess(config: PreprocessConfig, groups: list[InputGroup] | None = None) -> list[DatasetSummary]:
    """Tokenize every input into its output dataset; return one summary per dataset, in name order.

    `groups` replaces the discovery of `config.inputs` by the naming rule (Megatron's one `--output-prefix`
    for the files given).

    Workers are spawned (not forked), so a script that calls this with `workers > 1` needs the usual
    `if __name__ == "__main__":` guard around its entry; the CLI and `tools/preprocess_data.py` have it.
    """
    groups = discover_inputs(config.inputs) if groups is None else groups
    tokenizer = SentencePieceTokenizer(config.tokenizer_model)
    if config.append_eod and tokenizer.eos_id is None:
        raise ValueError(f"{config.tokenizer_model}: the tokenizer has no EOS token (eos_id is -1), so "
                         "--append-eod cannot mark document ends; use a model with an EOS or pass --no-append-eod")
    dtype = best_dtype(tokenizer.vocab_size)
    spec = EncoderSpec(str(config.tokenizer_model), tokenizer.newline_cuts, config.json_key,
                        tokenizer.eos_id if config.append_eod else None, dtype.str, config.sentence_lists)

    def log(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    with FolderLock(config.output_dir, "preprocess run"):  # one writer per output folder
        removed = remove_dead_writers_temporaries(config.output_dir)
        if removed:
            log(f"removed {len(removed)} temporary files of a dead run: {', '.join(p.name for p in removed[:4])}")
        if config.skip_bad_files:
            groups = _without_bad_files(groups, log)
        return _run(config, groups, tokenizer, dtype, spec, log)


def _without_bad_files(groups: list[InputGroup], log) -> list[InputGroup]:
    """The groups minus compressed files that fail a test pass; a group left with no file is dropped."""
    kept = []
    for group in groups:
        files = []
        for path in group.files:
            fault = archive_fault(path)
            if fault is None:
                files.append(path)
            else:
                log(f"warning: skipping {fault}")
        if files:
            kept.append(dataclasses.replace(group, files=tuple(files)))
        else:
            log(f"warning: no readable input left for {group.name}: no dataset written for it")
    return kept


def _run(config: PreprocessConfig, groups, tokenizer, dtype, spec, log) -> list[DatasetSummary]:
    """The run proper, under the output folder's lock."""
    outputs = _Outputs(groups, config, dtype, log)
    total_bytes = sum(path.stat().st_size for group in groups for path in group.files)
    # Redirected to a log file, a bar redrawn ten times a second is noise: update it twice a minute.
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    start, documents, tokens, text_bytes = time.perf_counter(), 0, 0, 0
    pool = InProcess(spec, tokenizer) if config.workers == 1 else ProcessPool(spec, config.workers)
    failed = True
    try:
        for batch, encoded in pool.map_ordered(_line_batches(groups, config.batch_bytes)):
            outputs.add(batch, encoded)
            documents, tokens = documents + encoded.documents, tokens + len(encoded.tokens)
            text_bytes += encoded.input_bytes
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{documents / elapsed:,.0f} docs/s, {text_bytes / elapsed / 1e6:.1f} MB/s, "
                                f"{tokens / elapsed:,.0f} tokens/s", refresh=False)
            bar.update(batch.file_bytes)
        summaries = outputs.finish()
        failed = False
        return summaries
    except BaseException:
        outputs.abort()
        if outputs.published:  # complete, and kept: a late failure must not cost hours of finished work
            log(f"finished before the failure, and published: {', '.join(outputs.published)}")
        raise
    finally:
        pool.close(terminate=failed)
        bar.close()


def format_summary(summaries: list[DatasetSummary]) -> str:
    """The end-of-run table: one row per dataset, a total row, then skipped lines by reason."""
    header = ("dataset", "files", "documents", "tokens", "input MB", "output MB", "skipped", "seconds")
    rows = [(s.name, f"{s.files:,}", f"{s.documents:,}", f"{s.tokens:,}", f"{s.input_bytes / 1e6:,.2f}",
             f"{s.output_bytes / 1e6:,.2f}", f"{sum(s.skipped.values()):,}", f"{s.seconds:,.1f}")
            for s in summaries]
    seconds = sum(s.seconds for s in summaries)
    total = lambda attr: sum(getattr(s, attr) for s in summaries)  # noqa: E731
    rows.append(("total", f"{total('files'):,}", f"{total('documents'):,}", f"{total('tokens'):,}",
                 f"{total('input_bytes') / 1e6:,.2f}", f"{total('output_bytes') / 1e6:,.2f}",
                 f"{sum(sum(s.skipped.values()) for s in summaries):,}", f"{seconds:,.1f}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{total('tokens') / max(seconds, 1e-9):,.0f} tokens/s")
    for s in summaries:
        if s.skipped:
            reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(s.skipped.items()))
            lines.append(f"skipped in {s.name}: {reasons}")
    return "\n".join(lines)
