from __future__ import annotations

import math

import numpy as np
import pytest

from tierserve.bench.arrivals import gamma_arrivals, trace_arrivals


def test_poisson_rate_and_determinism() -> None:
    t = gamma_arrivals(20001, rate=4.0, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert gamma_arrivals(50, 4.0, seed=1) == t[:50]
    assert gamma_arrivals(50, 4.0, seed=2) != t[:50]


def test_burstiness_changes_variability_not_rate() -> None:
    for b in (0.25, 4.0):
        gaps = np.diff(gamma_arrivals(20001, rate=2.0, burstiness=b, seed=0))
        assert gaps.mean() == pytest.approx(0.5, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(b), rel=0.07)


def test_infinite_rate_sends_all_at_once() -> None:
    assert gamma_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        gamma_arrivals(3, 0.0)


def test_trace_times_shift_and_scale() -> None:
    assert trace_arrivals([10.0, 10.0, 13.0], time_scale=2.0) == [0.0, 0.0, 6.0]
    with pytest.raises(ValueError, match="not in order"):
        trace_arrivals([2.0, 1.0])
