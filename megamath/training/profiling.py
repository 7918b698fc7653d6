"""Profiling on demand: a torch.profiler trace of a window of steps, CUDA memory snapshots, and what an
out-of-memory error leaves behind.

Why a window and not the whole run: a trace of every kernel of every step is gigabytes and slows the
steps it watches; a few steps after warm-up show the steady state. Each rank writes its own trace
(ranks differ: a straggler shows in its own file), Chrome/Perfetto JSON, into RUN_DIR/profile/:

    trace_steps{a}-{b}_rank{r}.json        `profile.steps: [a, b]`, each step a `step N` range, each phase
                                           (forward, backward, grad_reduce, ...) a range inside it
    kernels_steps{a}-{b}_rank{r}.md        the same window's kernels summed by kind (GEMM, attention, norm, ...)
                                           with the share of the steps the device sat idle (kernel_kinds.py)
    memory_step{s}_rank{r}.pickle          `profile.memory: true` (GPUs): allocations with their stacks,
                                           for PyTorch's memory visualizer
    oom_memory_rank{r}.pickle              written when a step runs out of GPU memory, before the run stops

Each file is written under a temporary name beside it and renamed into place (atomic_io.publish_file): a run
killed mid-write leaves no truncated trace under the real name (Perfetto refuses one with no hint), and the
next run removes the dead writer's temporary. The profile is a help, not the run's work: a file that cannot
be written (a full disk) is a one-line warning naming it, and the run goes on.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from megamath.atomic_io import publish_file, remove_dead_temporaries
from megamath.training.kernel_kinds import breakdown_table, summarize

PROFILE_DIR = "profile"
HISTORY_ENTRIES = 100_000
"""Allocation events kept by the CUDA memory history (a ring buffer: older ones are dropped)."""
TRACE_END = re.compile(rb'"traceName"\s*:\s*"(?:[^"\\]|\\.)*"\s*\}\s*\Z')
"""How Kineto (torch.profiler's writer) ends a whole trace: its last member, `"traceName": PATH`, then the brace."""


class OutOfMemoryStop(RuntimeError):
    """A step ran out of GPU memory; the message says where the memory snapshot went."""


def export_trace(profiler, path: Path) -> None:
    """`profiler.export_chrome_trace(path)`, checked whole. Why: torch.profiler's writer (Kineto's) notices a
    failed write only before its last flush; a disk that fills in that flush leaves a cut file, which it renames
    into place and reports nowhere."""
    profiler.export_chrome_trace(str(path))
    if path.is_file() and torch.autograd.kineto_available():  # (without Kineto, Python writes it and raises)
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            if TRACE_END.search(f.read()) is None:
                raise OSError("the trace was cut short (the disk filled as it was written?)")


class StepProfiler:
    """Opens the profiler for the steps of `steps` ([first, last], inclusive) and writes what it saw.

    Call `begin(step)` once the step's timing is open, before its first work, and `end(step)` after its last
    work, before its timing closes: the record and the save come after, between two `step N` ranges (in the
    trace only when the window goes on past them); `close()` when the run stops (a run that ends inside the
    window still writes its trace). Starting the profiler and writing what it saw is the step's `profile`
    phase, which throughput leaves out as it does evaluation and checkpoints.

    `settle` (optional) is called before the profiler stops and must finish the collectives still in flight
    (the optimizer's overlapped parameter all-gathers): an asynchronous collective's profiled range is
    closed by the communication library's own thread when the work completes, and that thread must not
    close it while this one tears the profiler down (the suspected cause of a crash seen once in a two-rank
    test, in a gloo wait at the window's end).
    """

    def __init__(self, steps: list[int], memory: bool, run_dir: Path, rank: int, device: torch.device,
                 timer, settle: Callable[[], None] | None = None) -> None:
        self.first, self.last = steps if steps else (None, None)
        self.dir, self.rank, self.timer = Path(run_dir) / PROFILE_DIR, rank, timer
        self.settle = settle
        self.cuda = device.type == "cuda"
        self.memory = memory and self.cuda
        self.profiler = None
        self.step_range = None
        self.memory_written = False
        self.window_start = None
        remove_dead_temporaries(self.dir, ".tmp-", anywhere=True)  # a killed run's, whatever window it wrote
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)

    def in_window(self, step: int) -> bool:
        return self.first is not None and self.first <= step <= self.last

    def begin(self, step: int) -> None:
        if not self.in_window(step):
            return
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with self.timer.phase("profile"):  # seconds: not training work, and not hidden between two steps
                # One window is one profiling cycle, so accumulating events changes nothing; it only keeps
                # torch 2.11 (the GPU image's) from warning that events are cleared between cycles.
                self.profiler = torch.profiler.profile(activities=activities, acc_events=True)
                self.profiler.__enter__()
            self.window_start, self.window_clock = step, time.perf_counter()
            self.timer.annotate = True
        self.seen = step
        self.step_range = torch.profiler.record_function(f"step {step}")
        self.step_range.__enter__()

    def end(self, step: int) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        trace = self.profiler is not None and step >= self.last
        snapshot = self.memory and not self.memory_written and (self.first is None or step >= self.last)
        if not (trace or snapshot):
            return
        self.timer.annotate = False  # the window ends here
        with self.timer.phase("profile"):
            if trace:
                self._write_trace(step)
            if snapshot:
                path = self.dir / f"memory_step{step}_rank{self.rank}.pickle"
                self._write_or_warn(path, lambda: self.write_memory_snapshot(path))
                self.memory_written = True

    def _write_trace(self, step: int) -> None:
        profiler, self.profiler = self.profiler, None
        self.timer.annotate = False
        if self.settle is not None:
            self.settle()
        if self.cuda:
            torch.cuda.synchronize()  # the window's kernels must have finished to be in the trace
        wall = time.perf_counter() - self.window_clock
        profiler.__exit__(None, None, None)
        name = f"steps{self.window_start}-{step}_rank{self.rank}"
        trace = self.dir / f"trace_{name}.json"
        self._publish_or_warn(trace, lambda tmp: export_trace(profiler, tmp))
        steps = step - self.window_start + 1
        try:  # the summary beside the trace is a help, never the run's failure
            lines = breakdown_table(summarize(profiler, steps, self.cuda, wall), f"steps {self.window_start}-{step}")
        except Exception as err:
            lines = [f"no breakdown: {type(err).__name__}: {err}"]
        kinds = self.dir / f"kernels_{name}.md"
        self._publish_or_warn(kinds, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))

    @staticmethod
    def _publish(path: Path, write_to: Callable[[Path], None], kept: str | None = "the run goes on without it") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        publish_file(path, write_to, kept)

    def _publish_or_warn(self, path: Path, write_to: Callable[[Path], None]) -> None:
        """`write_to(temporary)`, published as `path` (`_publish`), or a warning naming it (`_write_or_warn`)."""
        self._write_or_warn(path, lambda: self._publish(path, write_to))

    def _write_or_warn(self, path: Path, write: Callable[[], object]) -> None:
        """`write()`, or a one-line warning naming `path` when it fails: the profile is a help, and a full disk
        (or a file where profile/ should be) must not end the run it watches."""
        try:
            write()
        except Exception as err:
            text = " ".join(str(err).split())
            if f"could not write {path}" not in text:
                text = f"could not write {path}: {type(err).__name__}: {text}; the run goes on without it"
            tqdm.write(f"warning: rank {self.rank}: {text}", file=sys.stdout)
            sys.stdout.flush()

    def write_memory_snapshot(self, path: Path, kept: str | None = "the run goes on without it") -> bool:
        """The CUDA allocator's state (and its history when recorded) as a pickle; False without a GPU."""
        if not self.cuda:
            return False
        self._publish(path, lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)), kept)
        return True

    def out_of_memory(self, step: int, err: BaseException) -> OutOfMemoryStop:
        """The error to stop the run with, after writing the memory snapshot that explains it."""
        path = self.dir / f"oom_memory_rank{self.rank}.pickle"
        try:
            written = self.write_memory_snapshot(path, kept=None)  # the run stops: say what is left
        except Exception as snap_err:  # the snapshot is a help, never a second failure
            written, path = False, f"(none: writing it failed: {snap_err})"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = (f"memory snapshot written to {path} (open it in PyTorch's memory visualizer)" if written
                 else "no memory snapshot (not a CUDA device)" if not self.cuda else f"memory snapshot {path}")
        hint = ("" if self.memory else "; rerun with profile.memory=true to see which allocations led there")
        return OutOfMemoryStop(f"rank {self.rank} ran out of GPU memory in step {step}: {first_line}. {where}{hint}. "
                               "Lower micro_batch_size or turn on model.activation_checkpointing")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # called while unwinding too: never hide the run's own error
            if self.step_range is not None:
                self.step_range.__exit__(None, None, None)
                self.step_range = None
            if self.profiler is not None:
                self._write_trace(self.seen)
        if self.memory:
            with contextlib.suppress(Exception):
                torch.cuda.memory._record_memory_history(enabled=None)
