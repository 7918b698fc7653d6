"""Where a step's time goes: named phases (data, forward, backward, grad_reduce, optimizer, param_gather,
eval, sync, checkpoint) timed on the clock that sees the work.

Why two clocks. On a CPU the work happens when the host runs it, so a wall clock around each phase is
exact. On a GPU the host only enqueues kernels and races ahead; a wall clock would charge a phase for
whatever earlier work the host happened to wait on. CUDA events recorded on the stream instead measure
when the GPU reached each point. Reading an event's time needs the GPU to have passed it; asking at once
would be an extra host sync per phase, so a step's events are read one step later (MetricsLogger.write
keeps the newest step pending), when the loop's own syncs (the loss, the grad norm) have long passed them.

Phases nest nowhere and may repeat (forward/backward once per micro-batch): their times add up. The
step's time runs from `start_step` to `end_step` on the same clock, so anything outside every phase
shows as the difference between `step_time_s` and the sum of `phases`. The loop opens the next step as
soon as one ends, so the steps' times add up to the training's time as Megatron-LM's iteration time does.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

PHASES = ("data", "forward", "backward", "grad_reduce", "optimizer", "param_gather", "eval", "sync", "log",
          "checkpoint", "profile")
"""Every phase name a step may report. `sync` is the end-of-step agreement of the ranks on a preemption signal
(one scalar all-reduce): its time is mostly waiting for the slowest rank. `log` and `checkpoint` run first:
they are the previous step's record (with several ranks its step-time gather; NVML's readings; the line
written) and save, since steps are timed back to back, each from the end of the one before, so that no work
of the loop falls between two steps' times. `profile` is the profiler's own start and writing (a window's
first and last steps)."""
NOT_TRAINING = ("eval", "checkpoint", "profile")
"""Phases that throughput (tokens/s, TFLOP/s, MFU) leaves out: they are not training work."""
ALWAYS = PHASES[:6]
"""Phases every step reports (0.0 for one a step did not enter; a skipped update still enters all six, the
skip being decided on the device)."""


@dataclass
class StepTiming:
    """One step's markers; `resolve()` turns them into seconds."""

    start: object
    """perf_counter() seconds on CPU, a torch.cuda.Event on GPU."""
    end: object
    spans: list[tuple[str, object, object]] = field(default_factory=list)
    """(phase, start marker, end marker) in the order they ran."""

    def resolve(self) -> tuple[float, dict[str, float]]:
        """(step seconds, {phase: seconds}); on GPU it waits for the step's last event if it has not passed."""
        if isinstance(self.end, torch.cuda.Event):
            self.end.synchronize()
            seconds = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731 (ms between two events)
        else:
            seconds = lambda a, b: b - a  # noqa: E731
        phases = {name: 0.0 for name in ALWAYS}
        for name, a, b in self.spans:
            phases[name] = phases.get(name, 0.0) + seconds(a, b)
        return seconds(self.start, self.end), phases


class PhaseTimer:
    """Marks phases of the current step: `start_step()`, `with timer.phase(name): ...`, `end_step()`.

    `annotate` (set while a profiler window is open) also names each phase in the profiler's trace.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.annotate = False
        self._current: StepTiming | None = None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream: when the GPU gets here, not when the host does
            return event
        return time.perf_counter()

    def start_step(self) -> None:
        """Open the next step's timing; a no-op when it is open already (the loop opens it early to time a
        checkpoint saved after the previous step's record was written, which then counts in this step)."""
        if self._current is None:
            self._current = StepTiming(self._mark(), None)

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        if self._current is None:  # used outside a timed step (e.g. the optimizer in a test): time nothing
            yield
            return
        start = self._mark()
        try:
            with torch.profiler.record_function(name) if self.annotate else contextlib.nullcontext():
                yield
        finally:
            self._current.spans.append((name, start, self._mark()))

    def end_step(self) -> StepTiming:
        """The finished step's timing (on GPU, `resolve()` it a step later to avoid waiting)."""
        timing, self._current = self._current, None
        timing.end = self._mark()
        return timing


def no_phase(name: str):
    """The stand-in for `PhaseTimer.phase` when no timer is given."""
    return contextlib.nullcontext()
