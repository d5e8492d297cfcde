"""Arrival processes: when each session (a request, or the first turn of a conversation) is sent.

All return offsets in seconds from the start of the run, non-decreasing, starting at 0 for the first arrival.
- Poisson at ``rate`` req/s: exponential gaps (gamma with shape 1).
- Gamma with burstiness ``b``: gaps ~ Gamma(shape=b, scale=1/(rate·b)), mean 1/rate as for Poisson; b < 1 is
  burstier, b > 1 more regular (vLLM's ``--burstiness``).
- ``rate = inf``: everything at time 0; with a max concurrency this is the closed loop (a new request is sent as
  soon as one finishes).
- Trace timestamps: the trace's own times, shifted to start at 0 and multiplied by a time scale.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


def gamma_arrivals(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``num`` offsets with mean gap ``1/rate``; ``burstiness`` 1.0 is Poisson. ``rate`` inf → all zeros."""
    if num <= 0:
        return []
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf for no pacing), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def trace_arrivals(timestamps_s: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """Trace times (seconds) shifted so the first is 0 and multiplied by ``time_scale`` (> 1 slows the replay)."""
    if time_scale <= 0:
        raise ValueError(f"trace time scale must be > 0, got {time_scale}")
    if not timestamps_s:
        return []
    t0 = timestamps_s[0]
    out = [(t - t0) * time_scale for t in timestamps_s]
    if any(b < a for a, b in itertools.pairwise(out)):
        raise ValueError("trace timestamps are not in order; sort the trace by time first")
    return out
