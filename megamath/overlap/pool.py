"""Run a function over line batches in worker processes and get the results back in input order.

The same scheme as `megamath preprocess` (megamath/data/preprocess.py): the main process reads and
decompresses, at most `2 * workers` batches are in flight (memory stays bounded whatever the corpus
size), results come back in input order (so the output is identical for any worker count), and a worker
that dies raises here instead of hanging the run. `workers == 1` runs in this process, no pickling.
"""
from __future__ import annotations

import multiprocessing
import queue
import signal
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

from megamath.data.sources import LineBatch

BatchFn = Callable[[Any, bytes], Any]
"""fn(spec, batch bytes) -> result; module-level (picklable by reference) for worker processes."""


def _worker_main(fn: BatchFn, spec, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the workers
    seq = -1
    try:
        while (task := tasks.get()) is not None:
            seq, data = task
            results.put((seq, fn(spec, data)))
    except Exception:
        results.put((seq, traceback.format_exc()))


class InProcess:
    def __init__(self, fn: BatchFn, spec) -> None:
        self._fn, self._spec = fn, spec

    def map_ordered(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, Any]]:
        for batch in batches:
            yield batch, self._fn(self._spec, batch.data)

    def close(self, terminate: bool = False) -> None:
        pass


class ProcessPool:
    """Worker processes fed from one task queue, results reordered to input order."""

    def __init__(self, fn: BatchFn, spec, workers: int, name: str = "megamath-worker") -> None:
        context = multiprocessing.get_context("spawn")  # fork is unsafe with threads (tqdm)
        self._tasks, self._results = context.Queue(), context.Queue()
        self._max_in_flight = 2 * workers
        self._procs = [context.Process(target=_worker_main, args=(fn, spec, self._tasks, self._results),
                                       name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for proc in self._procs:
            proc.start()

    def map_ordered(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, Any]]:
        batches = iter(batches)
        in_flight: dict[int, LineBatch] = {}
        done: dict[int, Any] = {}
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
                    raise RuntimeError(f"a worker failed{where}:\n{result}")
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
                        raise RuntimeError(f"worker {dead[0].name} (pid {dead[0].pid}) died with exit code "
                                           f"{dead[0].exitcode}") from None

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


def make_pool(fn: BatchFn, spec, workers: int, name: str = "megamath-worker"):
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    return InProcess(fn, spec) if workers == 1 else ProcessPool(fn, spec, workers, name)
