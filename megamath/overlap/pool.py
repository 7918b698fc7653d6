"""Scan corpus files in worker processes and get their batches back in corpus order.

Unlike `megamath preprocess`, where the main process decompresses and workers tokenize, here each
worker reads whole files itself: the scan costs about as much per byte as zstd decompression plus
JSON parsing, so a single reading process would cap the run at roughly one core's decompression rate
(~300 MB/s) however many cores there are. Tasks are files (a ProofPile II subset is many files); a
worker streams each file's batches back as it goes (the results are candidates only, a few bytes per
batch), and the main process handles them in file order, holding back files that finish early. Memory
stays bounded: a worker holds one batch at a time and the main process only small results; the output
is identical for any worker count. `workers == 1` reads in this process, no pickling.

A worker that dies (killed, out of memory) or raises is a `WorkerError`, an OSError so that the CLI prints
it as one line; the worker's traceback, when it sent one, is the error's cause (shown with --debug).
"""
from __future__ import annotations

import multiprocessing
import queue
import signal
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

FileFn = Callable[[Any, Path, int], Iterator[Any]]
"""fn(spec, path, group) -> results of the file's batches, in order; module-level (picklable)."""

_BATCH, _FILE_DONE, _ERROR = "batch", "done", "error"


class WorkerError(ChildProcessError):
    """A scan worker died or failed: one line, not the main process's traceback around the worker's."""


class _RemoteTraceback(Exception):
    """The worker's traceback as text (what concurrent.futures does), set as the WorkerError's cause."""

    def __str__(self) -> str:
        return self.args[0]


def _worker_main(fn: FileFn, spec, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the workers
    seq = -1
    try:
        while (task := tasks.get()) is not None:
            seq, path, group = task
            for result in fn(spec, path, group):
                results.put((_BATCH, seq, result))
            results.put((_FILE_DONE, seq, None))
    except ValueError as err:  # bad input (e.g. a corrupt archive): one clear line in the main process
        results.put((_ERROR, seq, ("ValueError", str(err), "")))
    except Exception as err:
        summary = " ".join(traceback.format_exception_only(type(err), err)[-1].split())
        results.put((_ERROR, seq, ("WorkerError", summary, traceback.format_exc())))


def map_files(fn: FileFn, spec, files: Sequence[tuple[Path, int]], workers: int) -> Iterator[Any]:
    """fn's results for every (path, group) in `files`, in file order then batch order."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if workers == 1 or len(files) <= 1:
        for path, group in files:
            yield from fn(spec, path, group)
        return
    workers = min(workers, len(files))
    context = multiprocessing.get_context("spawn")  # fork is unsafe with threads (tqdm)
    tasks, results = context.Queue(), context.Queue()
    for seq, (path, group) in enumerate(files):
        tasks.put((seq, path, group))
    for _ in range(workers):
        tasks.put(None)
    procs = [context.Process(target=_worker_main, args=(fn, spec, tasks, results), name=f"megamath-overlap-{i}",
                             daemon=True) for i in range(workers)]
    for proc in procs:
        proc.start()
    held: dict[int, list[Any]] = {}  # results of files after the current one
    finished: set[int] = set()
    current, failed = 0, True
    try:
        while current < len(files):
            kind, seq, payload = _next(results, procs)
            if kind == _ERROR:
                error_type, message, worker_traceback = payload
                if error_type == "ValueError":  # its message names the file
                    raise ValueError(message)
                where = f" on {files[seq][0]}" if seq >= 0 else ""
                raise WorkerError(f"a scan worker failed{where}: {message}") from _RemoteTraceback(worker_traceback)
            if kind == _BATCH and seq == current:
                yield payload
            elif kind == _BATCH:
                held.setdefault(seq, []).append(payload)
            else:
                finished.add(seq)
            while current in finished:  # the current file is done: release the files held behind it
                current += 1
                yield from held.pop(current, [])
        failed = False
    finally:
        for proc in procs:
            if failed and proc.is_alive():
                proc.terminate()
            proc.join(timeout=None if not failed else 5.0)
        tasks.cancel_join_thread()
        tasks.close()
        results.close()


def _next(results, procs):
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [proc for proc in procs if not proc.is_alive() and proc.exitcode != 0]
            if dead:
                try:  # a worker that failed cleanly sent its traceback just before exiting
                    return results.get(timeout=1.0)
                except queue.Empty:
                    raise WorkerError(f"scan worker {dead[0].name} (pid {dead[0].pid}) died with "
                                      f"{_exit_status(dead[0].exitcode)}") from None


def _exit_status(code: int) -> str:
    """`exit code 3`, or for a signal its name (multiprocessing reports signal N as exit code -N)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"exit code {code}"
    return f"exit code {code} ({name}{', e.g. the out-of-memory killer' if name == 'SIGKILL' else ''})"
