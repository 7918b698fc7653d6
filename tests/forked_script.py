"""Run a test's Python script as `python script.py ARGS` would, without paying Python's start and the torch
and megamath imports (~2 s of CPU) per process.

The process is forked from a forkserver (started once per test session, clean: it only imported those
modules, no thread pools yet), then runs the script from the top as __main__ with sys.argv, the caller's
environment and working folder set, its stdout and stderr into a log file, or into two pipes (log=None).
It is a process of its own: signals, SIGKILL and exit codes behave as for a subprocess. `ScriptProcess`
offers the few subprocess.Popen calls the tests use.

Unlike a fresh `python script.py`, the process exits without the interpreter's shutdown (no atexit
handlers, no finalizing of objects still referenced at exit), and torch is imported before the script
runs: OpenMP read OMP_NUM_THREADS in the server, so the caller's value is applied with torch.set_num_threads.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

PRELOAD = ["torch", "torch._dynamo", "megamath.cli", "megamath.training.loop"]
"""torch._dynamo (with sympy: ~2 s of CPU) because most processes import it anyway, each on its own: a model built
on the meta device (init_from_hf, loading a checkpoint to generate or evaluate) draws `normal_` through torch._refs,
whose dynamo-disabling wrapper imports it on first use. It starts no thread and changes no signal handler."""


def _run_script(script: str, args: list[str], log, env: dict, cwd: str, file_size_limit: int | None = None) -> None:
    os.environ.clear()  # the caller's environment and folder now, not the server's from its start
    os.environ.update(env)
    os.chdir(cwd)
    if isinstance(log, str):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    else:  # the write ends of the stdout and stderr pipes
        for end, fd in zip(log, (1, 2)):
            os.dup2(end.fileno(), fd)
            end.close()
    if "OMP_NUM_THREADS" in env:
        import torch  # preloaded

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if file_size_limit is not None:  # a full disk for this process' writes to files (pipes are not held to it)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    sys.argv = [script, *args]
    exec(compile(Path(script).read_text(), script, "exec"), {"__name__": "__main__", "__file__": script})


class ScriptProcess:
    """`python script *args`, output (stdout and stderr together) into `log`, or with log=None into pipes that
    `communicate` reads, as subprocess's capture_output. env: the process' environment (the caller's by
    default); file_size_limit: RLIMIT_FSIZE (soft and hard) and SIGXFSZ ignored in the process before the
    script starts, as a subprocess' preexec_fn would set them."""

    def __init__(self, script: Path, args: list[str], log: Path | None, env: dict | None = None,
                 file_size_limit: int | None = None):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)  # used when the server starts, i.e. by the session's first call
        self.log = None if log is None else Path(log)
        if log is None:
            pipes = [context.Pipe(duplex=False) for _ in range(2)]  # (read end, write end): stdout, stderr
            target = tuple(write for _, write in pipes)
        else:
            target = str(log)
        self.process = context.Process(target=_run_script, args=(
            str(script), [str(a) for a in args], target, dict(os.environ if env is None else env), os.getcwd(),
            file_size_limit))
        self.process.start()
        self.pid = self.process.pid
        self._output, self._readers = [b"", b""], []
        if log is None:
            for end in target:
                end.close()  # the child holds its own copies: end of file when it (and what it started) exits
            for i, (read, _) in enumerate(pipes):
                self._readers.append(threading.Thread(target=self._drain, args=(read, i), daemon=True))
                self._readers[-1].start()

    def _drain(self, read, i: int) -> None:
        with read:
            while chunk := os.read(read.fileno(), 65536):
                self._output[i] += chunk

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # -N when killed by signal N, as Popen's

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.process.is_alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def communicate(self, timeout: float) -> tuple[str, str | None]:
        """Wait for the end (TimeoutExpired past `timeout` seconds); (its output, None), or with pipes (its
        stdout, its stderr)."""
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired(str(self.log or self.pid), timeout)
        if self.log is not None:
            return (self.log.read_text() if self.log.exists() else ""), None
        for reader in self._readers:
            reader.join(timeout)
            if reader.is_alive():  # a process it started still holds the pipe
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self._output[0].decode(), self._output[1].decode()
