"""LLEMMA's warmup + cosine schedule against values worked out by hand."""
import math

import pytest

from megamath.training.schedule import ScheduleConfig, decoupled_lr_at, lr_at

LLEMMA = ScheduleConfig(warmup_steps=500, decay_steps=48000, min_lr_ratio=1 / 30)


@pytest.mark.parametrize("step, expected", [
    (1, 1e-4 / 500),  # the first update already moves
    (250, 0.5e-4),
    (500, 1e-4),  # end of warmup: the peak, from both branches
    (24250, 1e-4 * 31 / 60),  # t = 1/2: cos = 0, so r + (1 - r)/2 = 1/30 + 29/60 = 31/60
    (48000, 1e-4 / 30),  # t = 1: the floor
    (60000, 1e-4 / 30),  # past decay_steps: t clipped to 1
])
def test_llemma_7b_values(step, expected):
    assert lr_at(step, 1e-4, LLEMMA) == pytest.approx(expected, rel=1e-12)


def test_thirds_of_the_cosine():
    config = ScheduleConfig(warmup_steps=10, decay_steps=70, min_lr_ratio=1 / 30)
    # t = 1/3: cos(π/3) = 1/2, factor ½(1 + ½) = 3/4, lr = 1/30 + 29/30 · 3/4 = 91/120
    assert lr_at(30, 1.0, config) == pytest.approx(91 / 120, rel=1e-12)
    # t = 2/3: cos(2π/3) = −1/2, factor 1/4, lr = 1/30 + 29/120 = 33/120
    assert lr_at(50, 1.0, config) == pytest.approx(33 / 120, rel=1e-12)


def test_shape_is_warmup_then_monotone_decay():
    config = ScheduleConfig(warmup_steps=20, decay_steps=200, min_lr_ratio=0.1)
    lrs = [lr_at(s, 3e-4, config) for s in range(1, 260)]
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))  # strictly rising through warmup
    assert max(lrs) == pytest.approx(3e-4) and lrs.index(max(lrs)) == 19  # the peak at step 20
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))  # never rising after it
    assert lrs[-1] == pytest.approx(3e-5) and min(lrs[19:]) == pytest.approx(3e-5)


def test_no_warmup_starts_at_the_peak():
    config = ScheduleConfig(warmup_steps=0, decay_steps=100, min_lr_ratio=0.0)
    assert lr_at(1, 2.0, config) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 100)))
    assert lr_at(100, 2.0, config) == pytest.approx(0.0, abs=1e-15)


def test_errors():
    with pytest.raises(ValueError, match=r"^schedule.decay_steps \(500\) must exceed schedule.warmup_steps \(500\)$"):
        ScheduleConfig(warmup_steps=500, decay_steps=500)
    with pytest.raises(ValueError, match=r"^schedule.warmup_steps must be a non-negative integer, got -1$"):
        ScheduleConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"^schedule.min_lr_ratio must be a number in \[0, 1\], got 2$"):
        ScheduleConfig(min_lr_ratio=2)
    with pytest.raises(ValueError, match=r"^step must be > 0 \(the first update is step 1\), got 0$"):
        lr_at(0, 1e-4, LLEMMA)


def test_the_decoupled_schedule_has_the_same_shape_from_its_own_peak_to_its_own_floor():
    """Megatron-LM's --decoupled-lr group: the same warmup and cosine, from decoupled_lr to decoupled_min_lr, or to
    the other parameters' floor (--min-lr, here min_lr_ratio × lr) without one."""
    cfg = ScheduleConfig(warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert decoupled_lr_at(5, 1e-4, None, None, cfg) is None
    assert decoupled_lr_at(5, 1e-4, 5e-4, 5e-5, cfg) == pytest.approx(2.5e-4)  # half of the warmup
    assert decoupled_lr_at(60, 1e-4, 5e-4, 5e-5, cfg) == pytest.approx((5e-4 + 5e-5) / 2)  # the cosine's middle
    assert decoupled_lr_at(500, 1e-4, 5e-4, 5e-5, cfg) == pytest.approx(5e-5)
    assert decoupled_lr_at(500, 1e-4, 5e-4, None, cfg) == pytest.approx(1e-5)  # the others' floor, 0.1 × 1e-4
    with pytest.raises(ValueError, match="floor 0.0001 .* is above optimizer.decoupled_lr 5e-05"):
        decoupled_lr_at(1, 1e-3, 5e-5, None, ScheduleConfig(min_lr_ratio=0.1))
