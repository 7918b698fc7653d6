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
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megamath.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megamath.data.sources import (EMPTY_TEXT, BadLine, InputGroup, LineBatch, discover_inputs, parse_lines,
                                   read_line_batches)
from megamath.data.tokenizer import SentencePieceTokenizer


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
    batch_bytes: int = 1 << 20
    """Decompressed bytes of whole lines per batch sent to a worker (a few hundred documents)."""
    report_bad_lines: int = 5
    """Bad lines printed (and kept in the summary) per reason and dataset; all are counted."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes must be at least 1, got {self.batch_bytes}")
        if not self.json_key:
            raise ValueError("--json-key must not be empty")


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


# --- worker side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncoderSpec:
    """Everything a worker needs, small and picklable (workers load the tokenizer themselves)."""

    tokenizer_model: str
    newline_cuts: bool
    json_key: str
    eod_id: int | None
    dtype: str


@dataclass
class _Encoded:
    tokens: np.ndarray  # (sum(lengths),) in the dataset dtype
    lengths: np.ndarray  # (documents,) int64
    bad: list[tuple[int, str, str]]  # (line offset in the batch, reason, detail)
    input_bytes: int


class _BatchEncoder:
    """Raw lines -> validated texts -> one flat token array."""

    def __init__(self, spec: _EncoderSpec, tokenizer: SentencePieceTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or SentencePieceTokenizer(spec.tokenizer_model, newline_cuts=spec.newline_cuts)
        self.spec = spec

    def __call__(self, data: bytes) -> _Encoded:
        texts, bad = parse_lines(data, self.spec.json_key)
        tokens, lengths = self.tokenizer.encode_flat(texts, self.spec.eod_id, self.spec.dtype)
        extra = int(self.spec.eod_id is not None)
        if len(lengths) and int(lengths.min()) == extra:  # rare: a text the model maps to no tokens
            tokens, lengths, bad = self._drop_tokenless(tokens, lengths, bad, extra)
        return _Encoded(tokens, lengths, bad, len(data))

    def _drop_tokenless(self, tokens, lengths, bad, extra):
        bad_offsets = {offset for offset, _, _ in bad}
        good_offsets = [i for i in range(len(lengths) + len(bad)) if i not in bad_offsets]  # (documents,)
        empty = lengths == extra  # (documents,)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        keep_tokens = np.ones(len(tokens), dtype=bool)
        for doc in np.flatnonzero(empty):
            keep_tokens[starts[doc]:starts[doc] + lengths[doc]] = False
            bad.append((good_offsets[doc], EMPTY_TEXT, f"{self.spec.json_key!r} encodes to no tokens"))
        bad.sort()
        return tokens[keep_tokens], lengths[~empty], bad


def _worker_main(spec: _EncoderSpec, tasks, results) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seq = -1
    try:
        encode = _BatchEncoder(spec)
        while (task := tasks.get()) is not None:
            seq, data = task
            results.put((seq, encode(data)))
    except Exception:
        results.put((seq, traceback.format_exc()))


# --- main side: running batches -------------------------------------------------------------------


class _InProcess:
    """--workers 1: encode in this process, no pickling."""

    def __init__(self, spec: _EncoderSpec, tokenizer: SentencePieceTokenizer) -> None:
        self._encode = _BatchEncoder(spec, tokenizer)

    def map_ordered(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, _Encoded]]:
        for batch in batches:
            yield batch, self._encode(batch.data)

    def close(self, terminate: bool = False) -> None:
        pass


class _ProcessPool:
    """Worker processes fed from one task queue, with at most `2 * workers` batches in flight.

    Unlike `Pool.imap`, nothing is read ahead of that window, and a worker that dies (OOM killer)
    raises here instead of hanging the run.
    """

    def __init__(self, spec: _EncoderSpec, workers: int) -> None:
        context = multiprocessing.get_context("spawn")  # fork is unsafe with threads (tqdm, torch)
        self._tasks, self._results = context.Queue(), context.Queue()
        self._max_in_flight = 2 * workers
        self._procs = [context.Process(target=_worker_main, args=(spec, self._tasks, self._results),
                                       name=f"megamath-preprocess-{i}", daemon=True) for i in range(workers)]
        for proc in self._procs:
            proc.start()

    def map_ordered(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, _Encoded]]:
        batches = iter(batches)
        in_flight: dict[int, LineBatch] = {}
        done: dict[int, _Encoded] = {}
        sent = received = 0
        while True:
            while len(in_flight) < self._max_in_flight and (batch := next(batches, None)) is not None:
                self._tasks.put((sent, batch.data))
                in_flight[sent] = batch
                sent += 1
            if not in_flight:
                return
            while received not in done:
                seq, result = self._next_result()
                if isinstance(result, str):
                    where = f" on {in_flight[seq].file} from line {in_flight[seq].first_line}" if seq >= 0 else ""
                    raise RuntimeError(f"a preprocessing worker failed{where}:\n{result}")
                done[seq] = result
            yield in_flight.pop(received), done.pop(received)
            received += 1

    def _next_result(self):
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [proc for proc in self._procs if not proc.is_alive()]
                if dead:
                    try:  # a worker that failed cleanly sent its traceback just before exiting
                        return self._results.get(timeout=1.0)
                    except queue.Empty:
                        raise RuntimeError(f"preprocessing worker {dead[0].name} (pid {dead[0].pid}) died with "
                                           f"exit code {dead[0].exitcode}") from None

    def close(self, terminate: bool = False) -> None:
        """Stop the workers: after their current task, or at once when the run failed."""
        if not terminate:
            for _ in self._procs:
                self._tasks.put(None)
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            if not terminate:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
            proc.join()
        self._tasks.cancel_join_thread()
        self._tasks.close()
        self._results.close()


# --- main side: writing datasets --------------------------------------------------------------------


class _Outputs:
    """Writers and summaries of the output datasets, fed batches in input order (group by group)."""

    def __init__(self, groups: list[InputGroup], config: PreprocessConfig, dtype: np.dtype, log) -> None:
        self.config, self.dtype, self.log = config, dtype, log
        prefixes = [g.output_prefix(config.output_dir, config.json_key) for g in groups]
        self.summaries = [DatasetSummary(prefix.name, prefix, len(g.files)) for g, prefix in zip(groups, prefixes)]
        self._writers: dict[int, IndexedDatasetWriter] = {}
        self._next_to_finish = 0
        self._clock = time.perf_counter()

    def add(self, batch: LineBatch, encoded: _Encoded) -> None:
        self._finish_before(batch.group)
        summary = self.summaries[batch.group]
        for offset, reason, detail in encoded.bad:
            bad = BadLine(batch.file, batch.first_line + offset, reason, detail)
            if self.config.strict:
                raise ValueError(f"{bad} (strict mode stops at the first bad line)")
            count = summary.skipped.get(reason, 0) + 1
            summary.skipped[reason] = count
            if count <= self.config.report_bad_lines:
                summary.bad_lines.append(bad)
                self.log(f"skipped {bad}")
        self._writer(batch.group).add_documents(encoded.tokens, encoded.lengths)
        summary.documents += len(encoded.lengths)
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
            self._writer(index).finalize()
            del self._writers[index]
            summary, now = self.summaries[index], time.perf_counter()
            summary.output_bytes = sum(os.path.getsize(f"{summary.prefix}{ext}") for ext in (".bin", ".idx"))
            summary.seconds, self._clock = now - self._clock, now
            self._next_to_finish += 1

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
        for path in group.files:
            yield from read_line_batches(path, index, batch_bytes)


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
    spec = _EncoderSpec(str(config.tokenizer_model), tokenizer.newline_cuts, config.json_key,
                        tokenizer.eos_id if config.append_eod else None, dtype.str)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    outputs = _Outputs(groups, config, dtype, log)
    total_bytes = sum(path.stat().st_size for group in groups for path in group.files)
    # Redirected to a log file, a bar redrawn ten times a second is noise: update it twice a minute.
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    start, documents, tokens, text_bytes = time.perf_counter(), 0, 0, 0
    pool = _InProcess(spec, tokenizer) if config.workers == 1 else _ProcessPool(spec, config.workers)
    failed = True
    try:
        for batch, encoded in pool.map_ordered(_line_batches(groups, config.batch_bytes)):
            outputs.add(batch, encoded)
            documents, tokens = documents + len(encoded.lengths), tokens + len(encoded.tokens)
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
