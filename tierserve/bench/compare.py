"""`tierserve bench compare`: tierserve and its peers side by side, one after another in one invocation, on the
same machine, model, threads and workload (issue 7; the bars it is judged by are issue 6's).

Served mode starts each engine on loopback, waits for the machine to be idle, warms it with one wave of
``concurrency`` requests, then runs the serving benchmark (``runner.run_benchmark``) closed-loop at each
concurrency and stops it. Every request of every wave has its own prompt (disjoint slices of one workload), so
no engine gets a prefix-cache hit from an earlier wave; all engines get the same prompts. ``--offline`` runs the
same offline batch through each engine's offline API instead (``peers/offline.py``).

Writes to ``--output-dir``: ``compare.json`` / ``compare.md`` / ``compare.png`` (or ``offline.*``), each peer's
``result_c<N>.json`` in the harness's schema, and every engine's log under ``logs/``. Peers live outside the
repository (``peers/base.py``); one that is not installed, fails to install or crashes is reported with its
error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tierserve.bench.peers import Peer, peer_names, peers_dir
from tierserve.bench.peers.machine import cpu_description, wait_for_idle
from tierserve.bench.peers.offline import OfflineSpec, run_offline_peer
from tierserve.bench.peers.report import (
    OTHER_LOAD_WARN,
    offline_markdown,
    plot_offline,
    plot_serve,
    serve_markdown,
)
from tierserve.bench.peers.rounds import BASELINE, aggregate_rounds, drift, drift_markdown, load_run
from tierserve.bench.peers.serving import (
    DEFAULT_PEERS,
    CompareConfig,
    prepare,
    requests_per_level,
    serve_peer,
    workload_slices,
)
from tierserve.bench.peers.transformers_peer import fastest_dtype
from tierserve.bench.peers.weights import model_dir
from tierserve.bench.report import write_json

logger = logging.getLogger(__name__)

def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Served comparison; writes and returns ``compare.json``'s content.

    With ``cfg.repeats`` > 1 the engines run interleaved, one round after another, each round on the same prompts
    (every engine restarts each round, so nothing is cached across rounds); ``rounds`` keeps every round's entries
    (files under ``round<k>/``) and ``peers`` their medians (``rounds.aggregate_rounds``)."""
    out_dir = cfg.output_dir
    slices = workload_slices(cfg)
    data: dict[str, Any] = {"kind": "serve", "cpu": cpu_description(), "started_at": time.strftime("%FT%T%z"),
                            "settings": {**_settings_json(cfg), "num_requests": requests_per_level(cfg)},
                            "peers": [], "rounds": []}
    settings = cfg.settings()
    ready = [(name, *prepare(name, settings, cfg.install)) for name in cfg.peers]
    for k in range(cfg.repeats):
        entries: list[dict[str, Any]] = []
        data["rounds"].append(entries)
        round_dir = out_dir if cfg.repeats == 1 else out_dir / f"round{k + 1}"
        for name, peer, reason in ready:
            if cfg.repeats > 1:
                print(f"round {k + 1}/{cfg.repeats}: {name}", file=sys.stderr, flush=True)
            if peer is None or reason is not None:
                entries.append({"peer": name, "status": "unavailable", "error": reason, "points": []})
            else:
                entries.append(serve_peer(peer, cfg, slices, round_dir))
            data["peers"] = aggregate_rounds(data["rounds"])
            _write(data, out_dir, "compare", serve_markdown, plot_serve)
    return data


def run_offline(cfg: CompareConfig, spec: OfflineSpec, timeout_s: float) -> dict[str, Any]:
    """Offline comparison; writes and returns ``offline.json``'s content."""
    out_dir = cfg.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "offline_spec.json"
    spec_path.write_text(json.dumps(spec.build()))
    data: dict[str, Any] = {"kind": "offline", "cpu": cpu_description(), "started_at": time.strftime("%FT%T%z"),
                            "settings": asdict(spec), "peers": []}
    settings = cfg.settings()
    ready: list[Peer] = []
    for name in cfg.peers:
        peer, reason = prepare(name, settings, cfg.install)
        if peer is not None and peer.offline_command(spec_path, out_dir / "unused.json") is None:
            data["peers"].append({"peer": peer.name, "status": "skipped",
                                  "error": "no offline batch API (measured in served mode only)"})
        elif peer is None or reason is not None:
            data["peers"].append({"peer": name, "status": "unavailable", "error": reason})
        else:
            ready.append(peer)
    absent = list(data["peers"])
    # With --repeats N the engines run interleaved, the order reversed every other round (A B, B A, A B, ...), so
    # that a machine whose speed drifts over minutes slows both alike; the ratio is the median of the rounds' ratios.
    rounds: list[list[dict[str, Any]]] = []
    for k in range(cfg.repeats):
        round_dir = out_dir if cfg.repeats == 1 else out_dir / f"round{k + 1}"
        entries: list[dict[str, Any]] = []
        rounds.append(entries)
        for peer in ready if k % 2 == 0 else list(reversed(ready)):
            if cfg.repeats > 1:
                print(f"round {k + 1}/{cfg.repeats}: {peer.name}", file=sys.stderr, flush=True)
            entries.append(offline_with_retries(peer, cfg, spec_path, timeout_s, round_dir))
            if cfg.repeats > 1:
                data["rounds"] = rounds
            data["peers"] = absent + aggregate_offline_rounds(rounds)
            _write(data, out_dir, "offline", offline_markdown, plot_offline)
    return data


def aggregate_offline_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per engine, one entry over the rounds: output and total tok/s the median of the rounds' medians, every run's
    figure kept, and ``round_ratios`` - tierserve's output tok/s over the engine's, per round where both ran. A single
    round is returned as is."""
    if len(rounds) == 1:
        return rounds[0]
    names = list(dict.fromkeys(e["peer"] for r in rounds for e in r))
    by_round = [{e["peer"]: e for e in r} for r in rounds]
    out: list[dict[str, Any]] = []
    for name in names:
        entries = [r[name] for r in by_round if name in r]
        ok = [e for e in entries if e["status"] == "ok"]
        if not ok:
            out.append(entries[-1])
            continue
        agg = dict(ok[-1])
        agg["rounds"] = len(ok)
        agg["round_output_throughput"] = [e["output_throughput"] for e in ok]
        agg["output_throughput"] = statistics.median(agg["round_output_throughput"])
        agg["total_token_throughput"] = statistics.median(e["total_token_throughput"] for e in ok)
        agg["output_throughput_runs"] = [v for e in ok for v in e.get("output_throughput_runs", [])]
        agg["round_ratios"] = [r[BASELINE]["output_throughput"] / r[name]["output_throughput"] for r in by_round
                               if r.get(BASELINE, {}).get("status") == "ok" and r.get(name, {}).get("status") == "ok"]
        out.append(agg)
    return out


def offline_with_retries(peer: Peer, cfg: CompareConfig, spec_path: Path, timeout_s: float,
                         out_dir: Path | None = None) -> dict[str, Any]:
    """Run one engine's offline batch after an idle wait, again (``cfg.max_retries`` times at most) while other
    processes took more than ``OTHER_LOAD_WARN`` of the CPU; keeps the least disturbed attempt."""
    best: dict[str, Any] | None = None
    for attempt in range(1 + cfg.max_retries):
        idle = wait_for_idle(cfg.idle_min, timeout_s=cfg.idle_timeout_s)
        print(f"offline: {peer.name} ...", file=sys.stderr, flush=True)
        entry = run_offline_peer(peer, spec_path, out_dir or cfg.output_dir, cfg.threads, idle, timeout_s)
        other = (entry.get("cpu") or {}).get("other_load_frac", 0.0)
        print(f"offline: {peer.name}: {entry.get('output_throughput', entry.get('error'))} output tok/s, "
              f"other load {100 * other:.0f}%", file=sys.stderr, flush=True)
        if best is None or (entry["status"] == "ok" and other < (best.get("cpu") or {}).get("other_load_frac", 0.0)):
            best = entry
        best["attempts"] = attempt + 1
        if entry["status"] != "ok" or other <= OTHER_LOAD_WARN:
            break
    assert best is not None, "at least one attempt runs"
    return best


def _settings_json(cfg: CompareConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["output_dir"] = str(cfg.output_dir)
    d["peers_dir"] = str(peers_dir())
    return d


def _write(data: dict[str, Any], out_dir: Path, stem: str, markdown: Any, plot: Any) -> None:
    write_json(data, out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(markdown(data))
    try:
        plot(data, out_dir / f"{stem}.png")
    except Exception as e:  # a plot must never cost the measurements
        logger.warning("could not plot %s: %s", stem, e)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _peer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in peer_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown or text!r}; choose from {', '.join(peer_names())}")
    return names


def register(sub: Any) -> None:
    """Register `bench compare` under the `bench` subparsers."""
    p = sub.add_parser(
        "compare", help="tierserve vs llama.cpp, vLLM-CPU and transformers, side by side in one run",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start tierserve and each peer on loopback one after another (same model, threads and "
                    "workload; waiting for an idle machine in between), benchmark each, and write a side-by-side "
                    "table with ratios, JSON and a plot. Peers install on demand under $TIERSERVE_PEERS_DIR "
                    "(~/.cache/tierserve/peers) with --install. See docs/peers.md.")
    p.add_argument("--peers", type=_peer_list, default=DEFAULT_PEERS.split(","),
                   help=f"comma-separated, from: {', '.join(peer_names())}")
    p.add_argument("--model", default="smollm2-135m", help="tierserve model name or GGUF (the peers get the same "
                   "weights: the GGUF itself for llama.cpp, a safetensors copy for vLLM and transformers)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads, every engine")
    p.add_argument("--workload", default="random", choices=["random", "sharegpt"])
    p.add_argument("--input-len", type=int, default=200, help="prompt tokens (served mode)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    p.add_argument("--max-concurrency", type=_ints, default=[1, 4, 16], help="closed-loop concurrency levels")
    p.add_argument("--num-requests", type=_ints, default=None,
                   help="measured requests per level (one value, or one per level; default max(16, 4 x level)), "
                        "after one unmeasured wave of `level` requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default: bench_results/compare-<time>")
    p.add_argument("--install", action="store_true", help="install missing peers first (minutes; vLLM ~3.5 GiB)")
    p.add_argument("--install-only", action="store_true", help="install the peers, report, and exit")
    p.add_argument("--check", action="store_true", help="say which peers are ready, and exit")
    p.add_argument("--idle-min", type=float, default=0.9, help="CPU idle fraction to wait for before each run")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds to wait for it, then run anyway")
    p.add_argument("--max-retries", type=int, default=2,
                   help="measure a level again (fresh prompts) while other processes took > 10%% of the CPU")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to be healthy")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds, the engines interleaved (served: A B C, A B C, ...; offline: A B, B A, ...); the "
                        "table shows medians over rounds and, as ratio, the median of the per-round ratios "
                        "(steadier on a shared machine; each round takes as long as a single run)")
    o = p.add_argument_group("offline mode")
    o.add_argument("--offline", action="store_true", help="offline batch through each engine's LLM.generate")
    o.add_argument("--num-prompts", type=int, default=64)
    o.add_argument("--prompt-len", type=int, default=256)
    o.add_argument("--num-runs", type=int, default=3, help="timed runs; the median is reported")
    o.add_argument("--batch-size", type=int, default=16, help="transformers' generate batch")
    o.add_argument("--offline-timeout", type=float, default=3600.0, help="seconds per engine")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    stem = "offline" if args.offline else "compare"
    cfg = CompareConfig(
        peers=args.peers, model=args.model, threads=args.threads, workload=args.workload, input_len=args.input_len,
        output_len=args.output_len, concurrency=args.max_concurrency, num_requests=args.num_requests,
        seed=args.seed, install=args.install or args.install_only, idle_min=args.idle_min,
        idle_timeout_s=args.idle_timeout, max_retries=args.max_retries, start_timeout_s=args.start_timeout,
        repeats=args.repeats,
        output_dir=Path(args.output_dir or f"bench_results/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if args.check or args.install_only:
        for name in cfg.peers:
            _, reason = prepare(name, cfg.settings(), cfg.install)
            print(f"{name}: {'ready' if reason is None else reason}")
        return 0
    try:
        requests_per_level(cfg)
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the server under test
    try:
        return _run(args, cfg)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {cfg.output_dir}/", file=sys.stderr)
        return 130


def register_drift(sub: Any) -> None:
    """Register `bench drift`: how far the ratios of two served `bench compare` runs moved."""
    p = sub.add_parser(
        "drift", help="how far tierserve's ratios moved between two `bench compare` runs (re-run check)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Read two served `bench compare` results (their output folders or compare.json files) and "
                    "print, for every concurrency and engine in both, tierserve ÷ engine in each run and the change. "
                    "Exits 1 when a change exceeds the tolerance, 2 when a file cannot be read.")
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--tolerance", type=float, default=0.10, help="largest relative change accepted")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=cmd_drift)


def cmd_drift(args: argparse.Namespace) -> int:
    try:
        rows = drift(load_run(args.first), load_run(args.second))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("error: the two runs share no (concurrency, engine) ratio", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json
          else drift_markdown(rows, args.tolerance, (str(args.first), str(args.second))))
    return 0 if all(abs(r["change"]) <= args.tolerance for r in rows) else 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace, cfg: CompareConfig) -> int:
    if args.offline:
        spec = OfflineSpec(model=cfg.model, model_dir=str(model_dir(cfg.settings())), dtype=fastest_dtype(),
                           threads=cfg.threads, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
                           max_tokens=cfg.output_len, num_runs=args.num_runs, batch_size=args.batch_size,
                           seed=cfg.seed)
        print(offline_markdown(run_offline(cfg, spec, args.offline_timeout)))
    else:
        print(serve_markdown(run_compare(cfg)))
    print(f"results written to {cfg.output_dir}/", file=sys.stderr)
    return 0
