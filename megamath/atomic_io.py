"""Crash-safe publishing of files, shared by datasets, index caches and checkpoints.

The rule everywhere: write beside the target under a temporary name, fsync, rename over the target,
fsync the folder. A process killed at any point leaves either the old file or the new one, never a
half-written file under the real name.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import os
import shutil
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

_temp_counter = itertools.count()
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota reached, file size limit


class WriteError(OSError):
    """A file that could not be written, named with the room left where it goes (the CLI prints it as one line)."""


def free_space(folder: str | Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown space"


def is_out_of_room(err: BaseException) -> bool:
    """A full disk as a write reports it: an OSError naming no file, with ENOSPC, EDQUOT or EFBIG, or with no
    errno at all (numpy's `tofile` says only "N requested and M written"). Errors that name a file (a missing
    folder, a permission) or carry another errno (a read's EIO) are left as they are."""
    return type(err) is OSError and err.filename is None and (err.errno is None or err.errno in _NO_ROOM)


def write_error(path: str | Path, err: BaseException, kept: str | None = None) -> WriteError:
    """`err`, met while writing `path`, as one error naming the file, the room left and what survives
    (`kept`; by default the file that was there before, since every writer here publishes by rename)."""
    path = Path(path)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())
    return WriteError(f"could not write {path} ({free_space(path.parent)} free there): {reason}; "
                      f"{kept or f'any earlier {path.name} is untouched'}")


@contextlib.contextmanager
def naming_write_errors(path: str | Path, kept: str | None = None) -> Iterator[None]:
    """Turn a full disk met inside into a WriteError naming `path`.

    Why: a write past the end of the disk fails as "[Errno 28] No space left on device" (or EFBIG past a
    file size limit) with no file name, so a command's one-line error left the user guessing which of
    its files, and on which filesystem, ran out of room."""
    try:
        yield
    except OSError as err:
        if is_out_of_room(err):
            raise write_error(path, err, kept) from err
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to disk; a folder the filesystem refuses
    to fsync is skipped, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_tag() -> str:
    """`HOST-PID`, for temporaries a killed process leaves: `remove_dead_temporaries` tells whose they are."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_dead_temporaries(folder: str | Path, prefix: str, anywhere: bool = False) -> list[Path]:
    """Delete the entries `folder/{prefix}{HOST}-{PID}[-...]` made on this host by a process that is gone;
    with `anywhere`, `{prefix}{HOST}-{PID}` may follow any name (`X_document.bin.tmp-HOST-PID-N`).

    Why: a writer killed with SIGKILL cleans nothing up, and a model export's, a dataset's or a partitioning's
    temporary is as large as its output or input; the next run removes it. Another host's temporaries, and
    those of a process still alive, are left alone (a pid is only known dead on its own host)."""
    removed = []
    folder, start = Path(folder), f"{prefix}{socket.gethostname()}-"
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        at = path.name.find(start) if anywhere else (0 if path.name.startswith(start) else -1)
        pid = path.name[at + len(start):].split("-", 1)[0] if at >= 0 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def replace_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, then publish it as `path` (publish_file)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        # A device or pipe (`--output /dev/null`): a rename would replace it with a regular file; write through.
        with open(path, "wb") as f:
            write(f)
        return

    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    publish_file(path, write_to)


def write_text_atomically(path: str | Path, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def publish_file(path: str | Path, write_to: Callable[[Path], None], kept: str | None = None) -> None:
    """`write_to(temporary)` for a writer that takes a file name, not a file (torch.profiler's trace export, a
    CUDA memory snapshot), then publish the temporary as `path` as replace_atomically does.

    The temporary is `.{name}.tmp-HOST-PID-N` beside `path`; what the writer itself leaves beside the name it
    was given (the profiler writes `NAME.tmp` and renames it) starts with that name, so it is removed with it,
    and a killed writer's is swept by `remove_dead_temporaries` (its HOST-PID is in the name). A writer that
    fails quietly (the profiler only logs a failed write) leaves no file: that is an error too."""
    path = Path(path)
    remove_dead_temporaries(path.parent, f".{path.name}.tmp-")  # a killed writer's, of this very file
    tmp = path.with_name(f".{path.name}.tmp-{temp_tag()}-{next(_temp_counter)}")
    try:
        with naming_write_errors(path, kept):
            write_to(tmp)
            if not tmp.is_file():
                raise OSError("the writer left no file (its own message, if any, says why)")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        for left in tmp.parent.glob(f"{glob.escape(tmp.name)}*"):
            left.unlink(missing_ok=True)
