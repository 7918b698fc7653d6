"""Run a test's Python script as `python script.py ARGS` would, without paying Python's start and the torch
and megamath imports (~2 s of CPU) per process.

The process is forked from a forkserver (started once per test session, clean: it only imported those
modules, no thread pools yet), then runs the script from the top as __main__ with sys.argv, the caller's
environment and working folder set, its stdout and stderr into a log file. It is a process of its own:
signals, SIGKILL and exit codes behave as for a subprocess. `ScriptProcess` offers the few
subprocess.Popen calls the tests use.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

PRELOAD = ["torch", "megamath.cli", "megamath.training.loop"]


def _run_script(script: str, args: list[str], log: str, env: dict, cwd: str) -> None:
    os.environ.clear()  # the caller's environment and folder now, not the server's from its start
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [script, *args]
    exec(compile(Path(script).read_text(), script, "exec"), {"__name__": "__main__"})


class ScriptProcess:
    """`python script *args`, output (stdout and stderr together) into `log`."""

    def __init__(self, script: Path, args: list[str], log: Path):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)  # used when the server starts, i.e. by the session's first call
        self.log = Path(log)
        self.process = context.Process(target=_run_script, args=(str(script), [str(a) for a in args], str(log),
                                                                     dict(os.environ), os.getcwd()))
        self.process.start()
        self.pid = self.process.pid

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

    def communicate(self, timeout: float) -> tuple[str, None]:
        """Wait for the end (TimeoutExpired past `timeout` seconds); (its output, None)."""
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired(str(self.log), timeout)
        return (self.log.read_text() if self.log.exists() else ""), None
