"""LLEMMA's learning-rate schedule: linear warmup to the peak, then cosine decay to a fraction of it.

    step ≤ warmup:  lr = peak · step / warmup
    after:          lr = peak · (r + (1 − r) · ½ · (1 + cos(π · t))),   t = (step − warmup) / (decay − warmup)

with t clipped to [0, 1], so the rate holds at r · peak after `decay_steps` (LLEMMA 7B: warmup 500, decay
48,000, r = 1/30; the 7B run stopped at 42,000 steps, before the floor; the 34B decayed over its 12,000).
`step` is the 1-based number of the optimizer update being taken: the first update runs at peak / warmup,
update `warmup` at the peak, and both branches agree there. After another trainer's batch-size ramp it is a
fractional position instead, the samples read by the update's end over the global batch
(TrainData.schedule_position): Megatron-LM's scheduler counts samples, and so stands behind its iteration
count after a ramp. The peak itself is `optimizer.lr` (as Megatron's `--lr` is the peak of its schedule), so
the run has one learning rate to set.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ScheduleConfig:
    warmup_steps: int = 500
    """Updates of linear warmup from 0 to the peak (0: start at the peak)."""
    decay_steps: int = 48000
    """Update at which the cosine reaches its floor; counted from the start, warmup included."""
    min_lr_ratio: float = 1.0 / 30.0
    """Floor of the cosine as a fraction of the peak (LLEMMA: 1/30)."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"schedule.{name} must be a non-negative integer, got {value!r}")
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(f"schedule.decay_steps ({self.decay_steps}) must exceed schedule.warmup_steps "
                             f"({self.warmup_steps})")
        ratio = self.min_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be a number in [0, 1], got {ratio!r}")
        self.min_lr_ratio = float(ratio)


def lr_at(step: float, peak_lr: float, config: ScheduleConfig) -> float:
    """The learning rate of update `step` (1-based; a fractional schedule position after a batch-size ramp)
    under `config`, peaking at `peak_lr`."""
    if not step > 0:  # (a ramped run's last update may stand below 1: it read less than one global batch)
        raise ValueError(f"step must be > 0 (the first update is step 1), got {step}")
    warmup, decay, r = config.warmup_steps, config.decay_steps, config.min_lr_ratio
    if step <= warmup:
        return peak_lr * step / warmup
    t = min(max((step - warmup) / (decay - warmup), 0.0), 1.0)
    return peak_lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t)))


def decoupled_lr_at(step: float, peak_lr: float, decoupled_lr: float | None, decoupled_min_lr: float | None,
                    config: ScheduleConfig) -> float | None:
    """The learning rate of the embedding and the LM head at update `step` when optimizer.decoupled_lr sets
    theirs (None otherwise): the same warmup and cosine, from decoupled_lr down to decoupled_min_lr (default:
    the other parameters' floor, min_lr_ratio × peak_lr), as Megatron-LM schedules its decoupled group."""
    if decoupled_lr is None:
        return None
    floor = config.min_lr_ratio * peak_lr if decoupled_min_lr is None else decoupled_min_lr
    if floor > decoupled_lr:
        raise ValueError(f"the decoupled learning rate's floor {floor:g} (schedule.min_lr_ratio × optimizer.lr) is "
                         f"above optimizer.decoupled_lr {decoupled_lr:g}: set optimizer.decoupled_min_lr")
    return lr_at(step, decoupled_lr, dataclasses.replace(config, min_lr_ratio=floor / decoupled_lr))
