"""One writer per folder (or per output file): an advisory `fcntl` lock on a lock file.

Why: two trainings on one run_dir (or two preprocess runs into one output folder) otherwise race on the
same temporary files, and once produced a checkpoint holding one run's metadata and the other's weights.
The lock is `flock(LOCK_EX | LOCK_NB)` on `FOLDER/.megamath.lock`, held for the run's lifetime. The
kernel drops it when the holder exits, however it dies (kill -9 included), so a lock is never stale:
a file left by a dead holder is taken over at once. A clean release deletes the file while still
holding the lock, so an acquirer checks after locking that its file is still the one at the path (else
it retries on the new one). The holder writes what it does (training, reshard, ...), its pid, host and
command into the file so the refusal can say who holds it. Advisory locks work on local filesystems and
NFSv4/Lustre mounts that support flock; where the filesystem ignores them, nothing is refused.

A command that writes some files among others in a folder (`megamath overlap --output HITS.jsonl` and its
summary) locks only those, with a `FileLock` beside them (megamath.overlap.run.output_lock), so two runs
writing other files there both run.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".megamath.lock"


class LockBusyError(OSError):
    """Another live process holds the lock (an OSError: the CLI prints it as one line, exit 2)."""


class FolderBusyError(LockBusyError):
    """Another live process holds the folder's lock."""


class FileLock:
    """`with FileLock(lock_file, "overlap run", subject, "another --output"):` holds `lock_file` (its folder must
    exist) or raises LockBusyError: "SUBJECT is in use by another overlap run (HOLDER): wait for it to end or
    choose another --output"."""

    busy_error: type[LockBusyError] = LockBusyError

    def __init__(self, path: str | Path, what: str, subject: str | Path, instead: str) -> None:
        self.path, self.what, self.subject, self.instead = Path(path), what, Path(subject), instead
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                kind, holder = _read_holder(fd)
                os.close(fd)
                who = f"another {self.what}" if kind in ("", self.what) else f"a {kind}"  # a training holds a reshard's
                raise self.busy_error(f"{self.subject} is in use by {who} ({holder or 'holder unknown'}"
                                      f"): wait for it to end or choose {self.instead}") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder released and deleted this file meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, (f"{self.what}\npid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n").encode())
        os.fsync(fd)  # a network filesystem shows other nodes the holder (training's ranks compare it) once synced
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # still locked: nobody can be holding this file
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class FolderLock(FileLock):
    """`with FolderLock(folder, "training"):` holds `folder`'s lock (creating the folder) or raises FolderBusyError."""

    busy_error = FolderBusyError

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        super().__init__(self.folder / LOCK_NAME, what, self.folder, "another folder")

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        return super().acquire()


def _read_holder(fd: int) -> tuple[str, str]:
    """(what the holder is doing, who it is) from its lock file; a file of one line (an older megamath's)
    names no kind."""
    try:
        text = os.pread(fd, 500, 0).decode("utf-8", "replace").strip()
    except OSError:
        return "", ""
    kind, _, holder = text.partition("\n")
    return (kind, holder.strip()) if holder else ("", kind)
