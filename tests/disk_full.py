"""A full disk inside the test process, for the writers that run there: a file size limit (RLIMIT_FSIZE) makes
this process' writes past it fail with EFBIG, as a full disk fails them with ENOSPC (tests/test_writer_faults.py
sets it on a whole command's process instead)."""
from __future__ import annotations

import contextlib
import resource
import signal


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes of this process past `limit` bytes fail while inside; the limit and SIGXFSZ's handler are restored
    after. Keep the inside small: every file this process writes meanwhile is held to the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
