"""Worker processes that may die at any moment without hanging, orphaning or garbling the main process.

Shared by `megamath preprocess` (`data/preprocess_workers.py`) and `megamath overlap` (`overlap/pool.py`),
so that both behave alike under faults: a worker killed (kill -9, the out-of-memory killer) or failing is a
one-line `WorkerError` (status 1), a Ctrl-C is `interrupted` (status 130), and no worker outlives the run.
Why not a shared multiprocessing.Queue of results, and the rest of the plumbing here:
- A worker killed while putting a result on a shared queue left half a message in the pipe, and the main
  process blocked reading the rest forever (every worker holds that pipe's write end). Here each worker
  has its own result pipe and is its only writer: its death is an end of file, seen at once, cut message
  or not (`Workers.receive`).
- Spawn sends a child its start-up data through a pipe that the parent keeps open at both ends: a child
  killed before reading it all left the parent blocked in `start()`. Start-up data must stay well under a
  pipe's 64 KB, so that write never waits on the child; bulky data goes through `SharedBytes`.
- A Ctrl-C while the children import printed their tracebacks (their ignore-SIGINT line had not run yet)
  and, landing inside `start()`, left a child nobody tracked. Children are started with SIGINT blocked,
  which they inherit through exec, and this process's own Ctrl-C is held until all are tracked.
- Workers ask the kernel to kill them when the main process dies, however it dies (`die_with_parent`).
- Tasks go to each worker through a pipe of its own too, not a multiprocessing Queue: a Queue's locks are
  named semaphores, which the resource tracker is told about, and a process ending at the wrong moment
  (its feeder thread stopped mid-cleanup at exit) left the tracker to print warnings after the run's one
  line. One reader and one writer per pipe need no lock. A thread in the worker keeps its pipe drained
  (`task_stream`), so the main process never waits on a worker's work to hand it a task.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import threading
import traceback
from multiprocessing import connection, reduction, resource_tracker
from typing import Any, Callable, Iterator, Sequence


class WorkerError(ChildProcessError):
    """A worker died or failed: one line, not the main process's traceback around the worker's."""


class RemoteTraceback(Exception):
    """The worker's traceback as text (what concurrent.futures does), set as the WorkerError's cause."""

    def __str__(self) -> str:
        return self.args[0]


def failure(err: BaseException) -> tuple[str, str, str]:
    """What a worker sends for an exception: (type name, one-line summary, traceback)."""
    summary = " ".join(traceback.format_exception_only(type(err), err)[-1].split())
    return type(err).__name__, summary, traceback.format_exc()


def failure_error(what: str, sent: tuple[str, str, str]) -> WorkerError:
    """`failure`'s message as the main process raises it: `{what}: KeyError: 'x'`, the traceback as cause."""
    error = WorkerError(f"{what}: {sent[1]}")
    error.__cause__ = RemoteTraceback(sent[2])
    return error


def exit_status(code: int) -> str:
    """`exit code 3`, or for a signal its name (multiprocessing reports signal N as exit code -N)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"exit code {code}"
    return f"exit code {code} ({name}{', e.g. the out-of-memory killer' if name == 'SIGKILL' else ''})"


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when its parent dies, however it dies (kill -9 included), so no
    orphan keeps working; Linux only (prctl PR_SET_PDEATHSIG), a worker's polling covers the rest."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def task_stream(tasks: connection.Connection) -> Iterator[Any]:
    """A worker's tasks, until the main process closes its end of the pipe (or dies). A thread reads them as
    they come: a task bigger than a pipe's buffer (a preprocess batch) sent to a worker that is itself
    blocked sending a result would otherwise hold both processes for good."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(tasks.recv())
        except (EOFError, OSError):
            inbox.put(_NO_MORE)

    threading.Thread(target=read, name="megamath-tasks", daemon=True).start()
    while (task := inbox.get()) is not _NO_MORE:
        yield task


_NO_MORE = object()


def worker_started(parent_pid: int) -> None:
    """A worker's first line: die with the parent, and leave Ctrl-C to it (SIGINT arrived blocked, see
    `_ctrl_c_held`: ignoring it also drops one pending from start-up)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class SharedBytes:
    """An object pickled into an unlinked temporary file that spawned workers map (`load`): the start-up pipe
    carries a file descriptor instead of megabytes, and no file name is left behind however the run ends."""

    def __init__(self, obj: Any = None, fd: int | None = None) -> None:
        if fd is None:
            with tempfile.TemporaryFile() as f:
                f.write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
                f.flush()
                fd = os.dup(f.fileno())
        self._fd = fd

    def __reduce__(self):  # while a child is spawned: the descriptor is passed to it, not the bytes
        return _rebuild_shared, (reduction.DupFd(self._fd),)

    def load(self) -> Any:
        # mmap, not read: the workers share the descriptor's file offset
        with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as data:
            return pickle.loads(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _rebuild_shared(dup) -> SharedBytes:
    return SharedBytes(fd=dup.detach())


@contextlib.contextmanager
def _ctrl_c_held():
    """Inside, children are started with SIGINT blocked (the mask survives fork and exec; what
    multiprocessing's resource tracker does), and this process's Ctrl-C waits until the block ends."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask")
            or signal.getsignal(signal.SIGINT) is None):  # None: a handler set outside Python, not restorable
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending Ctrl-C is recorded here, or below
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, caught[0])  # Python's handler raises KeyboardInterrupt
    elif caught and previous == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


class Workers:
    """`count` spawned processes running `target(*args, tasks, results, parent_pid)`: `tasks` is the worker's
    end of its task pipe (read it with `task_stream`), `results` its end of its result pipe
    (`results.send(message)`); its first call should be `worker_started`. Each worker holds at most `depth`
    tasks: `free` finds one with room, `send` hands it a task, `task_done` says one finished."""

    def __init__(self, target: Callable, args: Sequence[Any], count: int, name: str, label: str,
                 depth: int = 2) -> None:
        self.label = label  # "scan worker": how errors name a worker
        self.depth = depth
        self.in_hand = [0] * count  # tasks sent to each worker and not yet done
        context = multiprocessing.get_context("spawn")  # fork is unsafe with threads (tqdm, torch)
        self.procs, self._conns, self._tasks = [], [], []
        # Spawning starts multiprocessing's resource tracker if none runs yet, and that start unblocks
        # SIGINT in this process after it: start it now, before Ctrl-C is held.
        resource_tracker.ensure_running()
        try:
            with _ctrl_c_held():
                for i in range(count):
                    task_reader, task_writer = context.Pipe(duplex=False)
                    reader, writer = context.Pipe(duplex=False)
                    proc = context.Process(target=target, args=(*args, task_reader, writer, os.getpid()),
                                           name=f"{name}-{i}", daemon=True)
                    try:
                        proc.start()
                    finally:  # the worker is the only reader of one and the only writer of the other
                        task_reader.close()
                        writer.close()  # so its death is our end of file
                    self.procs.append(proc)
                    self._tasks.append(task_writer)
                    self._conns.append(reader)
        except BaseException:
            self.stop(terminate=True)
            raise
        self._open = list(self._conns)

    def free(self) -> int | None:
        """The worker holding the fewest tasks, if it has room for another."""
        i = min(range(len(self.procs)), key=self.in_hand.__getitem__)
        return i if self.in_hand[i] < self.depth else None

    def send(self, i: int, task: Any) -> None:
        """Hand worker `i` a task. One that has died takes none: `receive` tells how it ended (its last
        message may be the error that ended it)."""
        self.in_hand[i] += 1
        try:
            self._tasks[i].send(task)
        except OSError:  # a broken pipe
            pass

    def task_done(self, i: int) -> None:
        self.in_hand[i] -= 1

    def receive(self) -> tuple[int, Any]:
        """(worker index, message) of the next message from any worker. A worker that dies, cut message or
        not, is a WorkerError; one that exited with status 0 is dropped from the wait."""
        while self._open:
            for conn in connection.wait(self._open):
                i = self._conns.index(conn)
                try:
                    return i, conn.recv()
                except (EOFError, OSError):  # its end of file: it exited, or died in the middle of a message
                    self._open.remove(conn)
                    proc = self.procs[i]
                    proc.join(timeout=5.0)
                    if proc.exitcode != 0 or self.in_hand[i]:
                        status = ("closed its pipe" if proc.exitcode is None
                                  else f"died with {exit_status(proc.exitcode)}" if proc.exitcode
                                  else f"exited with {self.in_hand[i]} task(s) not done")
                        raise WorkerError(f"{self.label} {proc.name} (pid {proc.pid}) {status}") from None
        raise WorkerError(f"every {self.label} exited with results still due")

    def stop(self, terminate: bool = False) -> None:
        """Close the task pipes, so the workers exit after their tasks in hand, and wait for them; or stop
        them at once when the run failed."""
        for conn in self._tasks:
            conn.close()
        for proc in self.procs:
            if not terminate:
                proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=5.0)
            if proc.is_alive():  # SIGTERM is not ignored, but a stopped process does not act on it
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
