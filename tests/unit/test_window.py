"""Sliding and decayed windows: exact sums against a brute-force model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerd.window import DecayedSum, LoadWindow, SlidingSum


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 1000), min_size=0, max_size=30))
def test_sliding_sum_is_the_sum_of_the_last_n(n, values):
    w = SlidingSum((2,), n)
    for v in values:
        w.add(np.array([v, 2 * v]))
    tail = values[-n:] if values else []
    assert len(w) == len(tail)
    np.testing.assert_array_equal(w.sum(), [sum(tail), 2 * sum(tail)])
    if tail:
        np.testing.assert_allclose(w.mean(), [np.mean(tail), 2 * np.mean(tail)])
    else:
        np.testing.assert_array_equal(w.mean(), [0, 0])


def test_resize_keeps_the_newest():
    w = SlidingSum((1,), 5)
    for v in range(1, 6):
        w.add(np.array([v]))
    w.resize(2)
    assert len(w) == 2 and w.sum()[0] == 4 + 5
    w.resize(4)
    w.add(np.array([10]))
    assert len(w) == 3 and w.sum()[0] == 4 + 5 + 10


def test_sum_is_a_copy_and_shape_is_checked():
    w = SlidingSum((2, 2), 3)
    w.add(np.ones((2, 2)))
    s = w.sum()
    s += 100
    assert w.sum().max() == 1
    with pytest.raises(ValueError, match="shape"):
        w.add(np.ones(3))
    with pytest.raises(ValueError, match="intervals"):
        SlidingSum((1,), 0)


def test_decay_halves_per_half_life():
    d = DecayedSum((1,), half_life_s=10.0)
    d.add(np.array([8.0]), t=100.0)
    d.add(np.array([0.0]), t=110.0)
    assert d.value()[0] == pytest.approx(4.0)
    d.add(np.array([1.0]), t=130.0)
    assert d.value()[0] == pytest.approx(4.0 / 4 + 1.0)


def test_decay_out_of_order_time_adds_without_decaying():
    d = DecayedSum((1,), half_life_s=10.0)
    d.add(np.array([8.0]), t=100.0)
    d.add(np.array([2.0]), t=90.0)
    assert d.value()[0] == pytest.approx(10.0)
    d.add(np.array([0.0]), t=110.0)  # decays from the newest time seen, 100
    assert d.value()[0] == pytest.approx(5.0)


def test_decay_rejects_bad_half_life():
    with pytest.raises(ValueError, match="half life"):
        DecayedSum((1,), 0.0)


def test_load_window_reset_and_configure():
    w = LoadWindow(layers=2, experts=3, intervals=2, half_life_s=5.0)
    for i in range(3):
        w.add(np.full((2, 3), i + 1), t=float(i))
    assert len(w) == 2 and w.added == 3
    np.testing.assert_array_equal(w.sliding.sum(), np.full((2, 3), 5))
    w.configure(intervals=1, half_life_s=1.0)
    assert len(w) == 1 and w.decayed.half_life_s == 1.0
    w.reset()
    assert len(w) == 0 and w.added == 0
    assert not w.decayed.value().any() and not w.sliding.sum().any()
