"""When a run stops early: a signal, the loss of torchrun's agent, or the run's time limit, agreed by every rank.

The loop asks once per step, at the step's end (`StopFlag.agreed`, one all-reduce that the step's host sync
needs anyway); on a yes every rank saves a checkpoint (outside a streak of skipped steps) and the run exits 0,
as on a preemption. Every rank must stop at the same step, or the save's collectives would hang, so each rank
says why it would stop and the ranks take the strongest reason (max): a signal on any rank stops all, and so
does the time limit, whose clocks differ by the ranks' start-up skew.

- SIGTERM / SIGUSR1 (SLURM's `--signal`, a scheduler's preemption): the handlers only set a flag.
- The rank's torchrun agent gone (killed by SIGKILL, or by the out-of-memory killer): torchrun starts each rank
  in a session of its own, so no signal reaches it then, and the ranks trained on unwatched, holding the run's
  lock.
- `exit_after_minutes` (Megatron-LM's `--exit-duration-in-mins`): minutes since the training started, reached at
  the end of a step; a walltime-limited job sets it a save's time under its limit.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch

from megamath.parallel.mappings import all_reduce_max_
from megamath.parallel.state import ParallelState

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A rank's reason to stop, as the all-reduce (max) compares them: a signal outranks the time limit.
_NONE, _TIME_LIMIT, _SIGNAL = 0, 1, 2


class StopFlag:
    """Set by SIGTERM / SIGUSR1 or the agent's loss; with `exit_after_minutes`, also by the clock."""

    def __init__(self, exit_after_minutes: float = 0.0, started: float | None = None) -> None:
        """started: time.monotonic() when the training began (default: now)."""
        self.signal_name: str | None = None
        self.reason: str | None = None
        """Why the run stops, for its last line: set when `agreed` says yes."""
        self._previous = {}
        self._started = time.monotonic() if started is None else started
        self.exit_after_minutes = exit_after_minutes
        # torchrun's agent is the parent of its ranks and sets TORCHELASTIC_RUN_ID; a gone parent means a
        # new parent pid (init, or a subreaper)
        self._agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, state: ParallelState) -> bool:
        """True on every rank when any rank was signalled or is past the time limit (they may see a signal, or
        cross the limit, at different steps); then `reason` says why, from this rank's view."""
        self._check_agent()
        elapsed = self.elapsed_minutes()
        own = self._own(elapsed)
        agreed = own
        if state.is_distributed:
            t = torch.tensor([float(own)], device=state.device)
            all_reduce_max_(t, state.world_group)
            agreed = int(t.item())
            if agreed == _SIGNAL and own != _SIGNAL:
                self._check_agent()  # a rank of this node may have seen the agent go just before this one could
                own = self._own(elapsed)
        if agreed:
            self.reason = (self.signal_name if own == _SIGNAL else
                           "a peer rank’s signal" if agreed == _SIGNAL else
                           f"the time limit (exit_after_minutes {self.exit_after_minutes:g}: "
                           + (f"{elapsed:.1f} min since the start)" if own == _TIME_LIMIT else "reached on another rank)"))
        return agreed != _NONE

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self._started) / 60.0

    def _own(self, elapsed_minutes: float) -> int:
        """This rank's reason to stop."""
        if self.signal_name is not None:
            return _SIGNAL
        if self.exit_after_minutes and elapsed_minutes >= self.exit_after_minutes:
            return _TIME_LIMIT
        return _NONE

    def _check_agent(self) -> None:
        if self.signal_name is None and self._agent is not None and os.getppid() != self._agent:
            self.signal_name = f"the loss of its torchrun agent (pid {self._agent})"
