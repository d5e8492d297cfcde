"""``build_off_main_thread``: the server builds its engine on a thread that exits, so that the engine thread's
OpenMP pool is the only one (see its docstring); results and errors come back to the caller."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tierserve.engine.async_engine import build_off_main_thread
from tierserve.errors import InvalidRequestError


def test_value_and_error_come_back() -> None:
    caller = threading.get_ident()
    assert build_off_main_thread(lambda: threading.get_ident()) != caller

    def fail() -> None:
        raise InvalidRequestError("bad", param="x")

    with pytest.raises(InvalidRequestError, match="bad"):
        build_off_main_thread(fail)


SCRIPT = """
import statistics, sys, threading, time
import tierserve  # its OpenMP settings, before torch
import torch
from tierserve.engine.async_engine import build_off_main_thread

def region_us(a):
    for _ in range(20):
        a.add(a)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        a.add(a)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6

a = torch.randn(256, 576)
build_off_main_thread(lambda: region_us(a))  # the model load
out = []
t = threading.Thread(target=lambda: out.append(region_us(a)))  # the engine thread
t.start()
t.join()
lone = region_us(a)  # the engine thread's pool is gone: the main thread alone
old = []  # the layout before the fix: a pool on the main thread (just made), then the engine thread's own
t = threading.Thread(target=lambda: old.append(region_us(a)))
t.start()
t.join()
print(out[0], lone, old[0])
"""


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a parallel region of two threads")
def test_engine_thread_regions_are_not_throttled() -> None:
    """The server's layout — parallel work on a loader thread that exits, then on a long-lived engine thread, none
    on the main thread — keeps short parallel regions on the engine thread about as fast as on a lone thread (in a
    fresh process: the test runner's main thread has pools of its own)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    engine_us, lone_us, old_layout_us = (float(v) for v in out.stdout.split())
    print(f"256x576 add, median: engine thread {engine_us:.1f} us, lone thread {lone_us:.1f} us, engine thread "
          f"beside a main-thread pool (the layout before the fix) {old_layout_us:.1f} us")
    assert engine_us < 3 * lone_us + 10, (engine_us, lone_us)
