"""Served mode of `bench compare`: the comparison's settings, its prompts, and one engine's run from start to stop.

Each engine is started on loopback after an idle wait, warmed with one wave of ``concurrency`` requests, measured
closed-loop at each concurrency with the serving harness (``runner.run_benchmark``), and stopped. Every request of
every wave has its own prompt (disjoint slices of one seeded workload), so no engine gets a prefix-cache hit from
an earlier wave, and every engine gets the same prompts.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.bench.peers import Peer, PeerError, PeerSettings, make_peer
from tierserve.bench.peers.base import free_port, tail
from tierserve.bench.peers.machine import CpuAccount, wait_for_idle
from tierserve.bench.peers.report import OTHER_LOAD_WARN
from tierserve.bench.report import write_json
from tierserve.bench.runner import BenchConfig, run_benchmark
from tierserve.bench.workloads import Workload, WorkloadConfig, build_workload

logger = logging.getLogger(__name__)

DEFAULT_PEERS = "tierserve,llamacpp,vllm,transformers"


@dataclass
class CompareConfig:
    """One `bench compare` invocation; ``num_requests`` None = ``auto_num_requests`` per concurrency."""

    peers: list[str] = field(default_factory=lambda: DEFAULT_PEERS.split(","))
    model: str = "smollm2-135m"
    threads: int = 2
    workload: str = "random"
    input_len: int = 200
    output_len: int = 128
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    num_requests: list[int] | None = None
    seed: int = 0
    output_dir: Path = Path("bench_results/compare")
    install: bool = False
    idle_min: float = 0.9
    idle_timeout_s: float = 300.0
    max_retries: int = 2
    start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    repeats: int = 1
    """Rounds: every engine runs once per round, interleaved (A B C, A B C, ...); the report takes medians."""

    def settings(self) -> PeerSettings:
        slot = self.input_len + self.output_len
        return PeerSettings(model=self.model, threads=self.threads, num_slots=max(self.concurrency),
                            slot_context=max(512, -(-(slot + 64) // 64) * 64))


def auto_num_requests(concurrency: int) -> int:
    """Measured requests at a concurrency: at least 16, and 4 full waves so the steady state dominates.

    (It was max(8, 3 x level): two back-to-back runs then differed by 14.5% in one ratio, at concurrency 4 with 12
    requests; BENCHMARKS.md.)"""
    return max(16, 4 * concurrency)


def requests_per_level(cfg: CompareConfig) -> list[int]:
    if cfg.num_requests is None:
        return [auto_num_requests(c) for c in cfg.concurrency]
    if len(cfg.num_requests) == 1:
        return cfg.num_requests * len(cfg.concurrency)
    if len(cfg.num_requests) != len(cfg.concurrency):
        raise ValueError(f"--num-requests gives {len(cfg.num_requests)} values for {len(cfg.concurrency)} "
                         "concurrencies; give one value or one per concurrency")
    return cfg.num_requests


def workload_slices(cfg: CompareConfig) -> dict[int, tuple[Workload, list[Workload]]]:
    """Per concurrency: a warm-up wave of ``concurrency`` requests, and the measured requests for the first attempt
    and each retry; every prompt distinct from every other."""
    wcfg = WorkloadConfig(name=cfg.workload, tokenizer=cfg.model, input_len=cfg.input_len, output_len=cfg.output_len)
    counts = requests_per_level(cfg)
    attempts = 1 + cfg.max_retries
    full = build_workload(wcfg, sum(conc + attempts * n for conc, n in zip(cfg.concurrency, counts, strict=True)),
                          cfg.seed)
    out: dict[int, tuple[Workload, list[Workload]]] = {}
    at = 0

    def take(n: int) -> Workload:
        nonlocal at
        at += n
        return Workload(full.name, full.sessions[at - n:at], None, dict(full.info))

    for conc, n in zip(cfg.concurrency, counts, strict=True):
        out[conc] = (take(conc), [take(n) for _ in range(attempts)])
    return out


def prepare(name: str, settings: PeerSettings, install: bool) -> tuple[Peer | None, str | None]:
    """The peer and why it cannot run (``None`` = ready), installing it first when asked."""
    try:
        peer = make_peer(name, settings)
    except ValueError as e:
        return None, str(e)
    reason = peer.unavailable_reason()
    if reason is not None and install:
        t0 = time.monotonic()
        print(f"installing {peer.name} into {settings.root} ...", file=sys.stderr, flush=True)
        try:
            peer.install()
            reason = peer.unavailable_reason()
        except (PeerError, OSError) as e:
            reason = f"install failed: {e}"
        print(f"  {peer.name}: {'ready' if reason is None else reason} ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return peer, reason


def _bench_config(cfg: CompareConfig, port: int, conc: int, n: int, label: str) -> BenchConfig:
    wcfg = WorkloadConfig(name=cfg.workload, tokenizer=cfg.model, input_len=cfg.input_len, output_len=cfg.output_len)
    return BenchConfig(base_url=f"http://127.0.0.1:{port}", workload=wcfg, num_requests=n, max_concurrency=conc,
                       seed=cfg.seed, num_warmups=0, request_timeout=cfg.request_timeout_s, disable_tqdm=True,
                       label=label)


def serve_peer(peer: Peer, cfg: CompareConfig, slices: dict[int, tuple[Workload, list[Workload]]],
               out_dir: Path) -> dict[str, Any]:
    """Start ``peer``, run every concurrency level against it, stop it; its entry for ``compare.json``."""
    entry: dict[str, Any] = {"peer": peer.name, "status": "ok", **peer.describe(), "points": []}
    entry["idle_before_start"] = wait_for_idle(cfg.idle_min, timeout_s=cfg.idle_timeout_s).to_json()
    port = free_port()
    proc = peer.start(port, cfg.threads, out_dir / "logs" / f"{peer.name}.log")
    entry["log"] = str(peer.log_path)
    try:
        entry["startup_s"] = peer.wait_healthy(port, cfg.start_timeout_s)
        print(f"{peer.name}: healthy after {entry['startup_s']:.1f} s", file=sys.stderr, flush=True)
        for conc in cfg.concurrency:
            warm, attempts = slices[conc]
            asyncio.run(run_benchmark(_bench_config(cfg, port, conc, warm.num_requests, "warmup"), warm))
            point = measure_point(peer, proc, cfg, port, conc, attempts, out_dir)
            entry["points"].append(point)
            sm = point["summary"]
            print(f"{peer.name} c={conc}: {sm['output_throughput']:.1f} out tok/s, {sm['completed']} ok, "
                  f"{sm['failed']} failed, other load {100 * (point['cpu'] or {}).get('other_load_frac', 0):.0f}%",
                  file=sys.stderr, flush=True)
    except PeerError as e:
        entry.update(status="crashed", error=str(e))
    finally:
        peer.stop()
    return entry


def measure_point(peer: Peer, proc: subprocess.Popen[bytes], cfg: CompareConfig, port: int, conc: int,
                  attempts: list[Workload], out_dir: Path) -> dict[str, Any]:
    """Measure one concurrency level after an idle wait; while other processes took more than
    ``OTHER_LOAD_WARN`` of the CPU, wait and measure again on fresh prompts (``cfg.max_retries`` times at most).
    The attempt with the least interference is kept; ``attempts`` records how many ran."""
    best: dict[str, Any] | None = None
    for i, workload in enumerate(attempts):
        idle = wait_for_idle(cfg.idle_min, timeout_s=cfg.idle_timeout_s)
        account = CpuAccount(proc.pid)
        label = f"{peer.name}_c{conc}"
        res = asyncio.run(run_benchmark(_bench_config(cfg, port, conc, workload.num_requests, label), workload))
        cpu = account.finish()
        if proc.poll() is not None:
            raise PeerError(f"{peer.name} exited (code {proc.returncode}) during the run at concurrency {conc}; "
                            f"log: {peer.log_path}\n{tail(peer.log_path) if peer.log_path else ''}")
        other = (cpu or {}).get("other_load_frac", 0.0)
        if best is None or other < (best["cpu"] or {}).get("other_load_frac", 0.0):
            result = res.to_json()
            path = write_json(result, out_dir / peer.name / f"result_c{conc}.json")
            best = {"concurrency": conc, "num_requests": workload.num_requests, "summary": result["summary"],
                    "idle_before": idle.to_json(), "cpu": cpu, "result_file": str(path)}
        best["attempts"] = i + 1
        if other <= OTHER_LOAD_WARN:
            break
        logger.warning("%s c=%d: other processes took %.0f%% of the CPU; measuring again", peer.name, conc,
                       100 * other)
    assert best is not None, "attempts is never empty"
    return best
