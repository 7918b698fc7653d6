"""Scan corpus files in worker processes and get their batches back in corpus order.

Unlike `megamath preprocess`, where the main process decompresses and workers tokenize, here each
worker reads whole files itself: the scan costs about as much per byte as zstd decompression plus
JSON parsing, so a single reading process would cap the run at roughly one core's decompression rate
(~300 MB/s) however many cores there are. Tasks are files (a ProofPile II subset is many files); a
worker streams each file's batches back as it goes (the results are candidates only, a few bytes per
batch), and the main process handles them in file order, holding back files that finish early. Memory
stays bounded: a worker holds one batch at a time and the main process only small results; the output
is identical for any worker count. `workers == 1` reads in this process, no pickling.

A worker that dies (killed, out of memory) or raises is a `WorkerError` (`megamath/workers.py`, shared with
`megamath preprocess`): a ChildProcessError, which the CLI prints as one line with status 1; the worker's
traceback, when it sent one, is the error's cause (shown with --debug). The spec (the test keys' table, ~8 MB
for GSM8K at n = 3 and 5) reaches the workers through a file, not spawn's start-up pipe (`SharedBytes`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from megamath.workers import SharedBytes, WorkerError, Workers, failure, failure_error, task_stream, worker_started

__all__ = ["FileFn", "WorkerError", "map_files"]

FileFn = Callable[[Any, Path, int], Iterator[Any]]
"""fn(spec, path, group) -> results of the file's batches, in order; module-level (picklable)."""

_BATCH, _FILE_DONE, _ERROR = "batch", "done", "error"


def _worker_main(fn: FileFn, shared_spec: SharedBytes, tasks, results, parent_pid: int) -> None:
    worker_started(parent_pid)  # Ctrl-C: the main process stops the workers
    seq = -1
    try:
        spec = shared_spec.load()
        shared_spec.close()
        for seq, path, group in task_stream(tasks):
            for result in fn(spec, path, group):
                results.send((_BATCH, seq, result))
            results.send((_FILE_DONE, seq, None))
    except ValueError as err:  # bad input (e.g. a corrupt archive): one clear line in the main process
        results.send((_ERROR, seq, ("ValueError", str(err), "")))
    except Exception as err:
        results.send((_ERROR, seq, failure(err)))


def map_files(fn: FileFn, spec, files: Sequence[tuple[Path, int]], workers: int) -> Iterator[Any]:
    """fn's results for every (path, group) in `files`, in file order then batch order."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if workers == 1 or len(files) <= 1:
        for path, group in files:
            yield from fn(spec, path, group)
        return
    workers = min(workers, len(files))
    shared_spec, pool = SharedBytes(spec), None
    queued = iter(enumerate(files))  # each worker holds at most two files; the next goes to the first free
    held: dict[int, list[Any]] = {}  # results of files after the current one
    finished: set[int] = set()
    current, failed = 0, True
    try:
        pool = Workers(_worker_main, (fn, shared_spec), workers, "megamath-overlap", "scan worker")
        _hand_out(pool, queued)
        while current < len(files):
            i, (kind, seq, payload) = pool.receive()
            if kind == _ERROR:
                if payload[0] == "ValueError":  # its message names the file
                    raise ValueError(payload[1])
                raise failure_error(f"a scan worker failed{f' on {files[seq][0]}' if seq >= 0 else ''}", payload)
            if kind == _BATCH and seq == current:
                yield payload
            elif kind == _BATCH:
                held.setdefault(seq, []).append(payload)
            else:
                finished.add(seq)
                pool.task_done(i)
                _hand_out(pool, queued)
            while current in finished:  # the current file is done: release the files held behind it
                current += 1
                yield from held.pop(current, [])
        failed = False
    finally:
        if pool is not None:
            pool.stop(terminate=failed)
        shared_spec.close()


def _hand_out(pool: Workers, queued: Iterator[tuple[int, tuple[Path, int]]]) -> None:
    while (i := pool.free()) is not None and (task := next(queued, None)) is not None:
        seq, (path, group) = task
        pool.send(i, (seq, path, group))
