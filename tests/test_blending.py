"""Blending indices (C++ against the numpy reference, shares, errors) and `--data-path` parsing."""
from __future__ import annotations

import numpy as np
import pytest

from megamath import _helpers
from megamath.data.blending import (build_blending_indices, build_blending_indices_ref, normalize_weights,
                                    parse_data_path)


def random_weights(rng):
    n = int(rng.choice([1, 2, 3, 7, int(rng.integers(1, 101))]))
    kind = rng.integers(5)
    if kind == 0:
        return rng.random(n) + 1e-3
    if kind == 1:  # extreme: tiny weights next to large ones
        return np.where(rng.random(n) < 0.5, 1e-9, 1.0)
    if kind == 2:
        return np.exp(rng.normal(0, 5, n))
    if kind == 3:  # equal weights: every step is a tie somewhere
        return np.full(n, 2.5)
    return rng.integers(1, 5, n).astype(float)  # small integers: frequent exact ties


def test_cpp_equals_reference_on_random_inputs():
    rng = np.random.default_rng(1234)
    for _ in range(150):
        weights = random_weights(rng)
        num_samples = int(rng.integers(1, 800))
        got_d, got_s = build_blending_indices(weights, num_samples)
        ref_d, ref_s = build_blending_indices_ref(weights, num_samples)
        assert got_d.dtype == np.int16 and got_s.dtype == np.int64
        np.testing.assert_array_equal(got_d, ref_d)
        np.testing.assert_array_equal(got_s, ref_s)


def test_small_example_by_hand():
    # w = (1/4, 3/4); errors w*(i+1) - count: i=0 (.25,.75)->1, i=1 (.5,.5) tie->0, i=5 (.5,.5) tie->0
    d, s = build_blending_indices([1.0, 3.0], 8)
    np.testing.assert_array_equal(d, [1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(s, [0, 0, 1, 2, 3, 1, 4, 5])


def test_one_dataset_takes_every_sample():
    d, s = build_blending_indices([0.3], 17)
    np.testing.assert_array_equal(d, np.zeros(17))
    np.testing.assert_array_equal(s, np.arange(17))


def test_each_prefix_tracks_the_weights():
    rng = np.random.default_rng(9)
    for _ in range(20):
        weights = normalize_weights(rng.random(int(rng.integers(2, 12))) + 0.01)
        num_samples = 3000
        d, s = build_blending_indices(weights, num_samples)
        onehot = np.zeros((num_samples, len(weights)), np.int64)
        onehot[np.arange(num_samples), d] = 1
        counts = np.cumsum(onehot, axis=0)  # (N, D) samples per dataset after each prefix
        # every dataset's samples are numbered 0, 1, 2, ... in order
        np.testing.assert_array_equal(s, counts[np.arange(num_samples), d] - 1)
        deviation = counts - np.arange(1, num_samples + 1)[:, None] * weights[None, :]
        assert np.abs(deviation).max() < 1.0 + 1e-9
        shares = counts[-1] / num_samples
        assert np.abs(shares - weights).max() < 1.0 / num_samples + 1e-12


def test_extreme_weights():
    d, _ = build_blending_indices([1e-9, 1.0, 1e-9], 5000)
    np.testing.assert_array_equal(np.bincount(d, minlength=3), [0, 5000, 0])


def test_many_datasets_up_to_the_int16_limit():
    d, s = build_blending_indices(np.ones(32767), 40)
    np.testing.assert_array_equal(d, np.arange(40))  # equal weights: ties go to the lowest index in turn
    np.testing.assert_array_equal(s, np.zeros(40))


@pytest.mark.parametrize("build", [build_blending_indices, build_blending_indices_ref])
@pytest.mark.parametrize("weights, num_samples, message", [
    ([1.0, 0.0], 10, "weights must be positive, got 0.0 at position 1"),
    ([-2.0, 1.0], 10, "weights must be positive, got -2.0 at position 0"),
    ([1.0, float("nan")], 10, "weights must be finite, got nan at position 1"),
    ([float("inf"), 1.0], 10, "weights must be finite, got inf at position 0"),
    ([], 10, "weights must be a non-empty 1-D list, got shape (0,)"),
    ([[1.0, 2.0]], 10, "weights must be a non-empty 1-D list, got shape (1, 2)"),
    ([1e308, 1e308], 10, "weights sum to inf; scale them down"),
    ([1.0], 0, "num_samples must be positive and fit in 64 bits, got 0"),
    ([1.0], -3, "num_samples must be positive and fit in 64 bits, got -3"),
    ([1.0], 2**63, f"num_samples must be positive and fit in 64 bits, got {2**63}"),  # was a pybind11 TypeError
    (np.ones(32768), 10, "at most 32767 datasets can be blended, got 32768"),
])
def test_errors(build, weights, num_samples, message):
    with pytest.raises(ValueError) as info:
        build(weights, num_samples)
    assert str(info.value) == message


def test_cpp_boundary_checks_its_own_inputs():
    with pytest.raises(ValueError, match=r"^weights must be finite and positive, weights\[1\] = -1\.0+$"):
        _helpers.build_blending_indices(np.array([1.0, -1.0]), 3)
    with pytest.raises(ValueError, match=r"^at most 32767 datasets can be blended, got 40000$"):
        _helpers.build_blending_indices(np.ones(40000), 3)
    with pytest.raises(ValueError, match=r"^num_samples must be positive, got 0$"):
        _helpers.build_blending_indices(np.ones(2), 0)


def test_parse_data_path():
    assert parse_data_path(["2", "A", "4", "B", "1", "C"]) == ([2.0, 4.0, 1.0], ["A", "B", "C"])
    assert parse_data_path(["only/prefix"]) == ([1.0], ["only/prefix"])
    assert parse_data_path(["0.5", "x.y_text_document"]) == ([0.5], ["x.y_text_document"])
    assert parse_data_path(["1e-3", "A", "3", "B"]) == ([1e-3, 3.0], ["A", "B"])


@pytest.mark.parametrize("items, message", [
    ([], "--data-path needs at least one dataset prefix"),
    (["3"], "--data-path 3 is a weight without a dataset prefix"),
    (["1", "A", "2"], "--data-path takes WEIGHT PREFIX pairs (or one PREFIX alone), got 3 items: 1 A 2"),
    (["A", "B"], "--data-path weight 'A' (item 1) is not a number; expected WEIGHT PREFIX pairs"),
    (["1", "A", "B", "2"], "--data-path weight 'B' (item 3) is not a number; expected WEIGHT PREFIX pairs"),
    (["0", "A"], "--data-path weight 0 for A must be positive and finite"),
    (["-1", "A", "1", "B"], "--data-path weight -1 for A must be positive and finite"),
    (["nan", "A"], "--data-path weight nan for A must be positive and finite"),
])
def test_parse_data_path_errors(items, message):
    with pytest.raises(ValueError) as info:
        parse_data_path(items)
    assert str(info.value) == message
