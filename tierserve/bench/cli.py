"""`tierserve bench`: the command group; `bench serve` is the online serving benchmark (issue 7).

`bench compare` (``compare.py``) and `bench throughput` / `bench latency` (``offline.py``) register themselves here.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tierserve.bench import compare, offline
from tierserve.bench.metrics import parse_slo
from tierserve.bench.report import markdown, write_report
from tierserve.bench.runner import BenchConfig, run_benchmark
from tierserve.bench.workloads import WORKLOADS, WorkloadConfig, build_workload
from tierserve.errors import TierserveError

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Register the `bench` command group and its subcommands."""
    p = sub.add_parser("bench", help="benchmarks: serve (online, any OpenAI-compatible server), compare, offline",
                       description="Benchmarks. Run `tierserve bench <subcommand> --help` for its flags.")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="subcommand", required=True)
    register_serve(bench_sub)
    compare.register(bench_sub)
    compare.register_drift(bench_sub)
    offline.register(bench_sub)


def _floats(text: str) -> list[float]:
    try:
        return [math.inf if v.strip().lower() == "inf" else float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (or inf), got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def register_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="online serving benchmark against an OpenAI-compatible server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Send a workload to a running OpenAI-compatible server (tierserve, llama.cpp's llama-server, "
                    "vLLM, SGLang) with streaming, and report TTFT, TPOT, ITL, E2E, throughput and goodput as "
                    "vLLM's `vllm bench serve` defines them. Writes result JSON, report.md and PNG plots to "
                    "--output-dir. Ctrl-C stops early and still writes the partial results. "
                    "See docs/benchmarking.md.")
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    g.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="API to call; chat sends messages and lets the server apply its chat template")
    g.add_argument("--model", default=None, help="model name sent in each request (default: the first id the "
                   "server lists at /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer <key>', for a server started with an API key (default: the "
                        "OPENAI_API_KEY environment variable, as vLLM's bench reads it; never written to results)")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request (stream included) may take before it counts as a 'timeout' failure")
    g.add_argument("--num-warmups", type=int, default=1, help="requests sent first and not measured")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (0 = greedy)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at end-of-sequence (by default requests send ignore_eos=true so every "
                        "request generates exactly its output length, as benchmarks do)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="random", choices=WORKLOADS,
                   help="random: prompts cut from real text; sharegpt: ShareGPT first turns; prefix: groups sharing a "
                        "long prefix; multiturn: conversations with history (closed loop); mooncake / azure: trace "
                        "replay with the trace's arrival times")
    w.add_argument("--num-requests", type=int, default=100, help="requests to send (for multiturn: turns in all)")
    w.add_argument("--seed", type=int, default=0, help="seed of prompt choice, lengths and arrival times")
    w.add_argument("--tokenizer", default="smollm2-135m", help="model name, .gguf file or folder with tokenizer.json "
                   "used to count and cut prompt tokens")
    w.add_argument("--dataset-path", default=None, help="data file instead of the default in ../shared/data "
                   "(sharegpt/multiturn: ShareGPT JSON or MT-Bench JSONL; mooncake: JSONL; azure: CSV)")
    w.add_argument("--input-len", type=int, default=200, help="random: prompt tokens; prefix: suffix tokens")
    w.add_argument("--output-len", type=int, default=None,
                   help="output tokens per request (default: 128 for random/prefix; the recorded reply's length for "
                        "sharegpt/multiturn; traces use their own, scaled)")
    w.add_argument("--range-ratio", type=float, default=0.0,
                   help="random/prefix: lengths uniform in [len*(1-r), len*(1+r)]")
    w.add_argument("--prefix-groups", type=int, default=4, help="prefix: number of distinct shared prefixes")
    w.add_argument("--prefix-len", type=int, default=512, help="prefix: tokens of each shared prefix")
    w.add_argument("--multiturn-source", default="sharegpt", choices=["sharegpt", "mtbench"],
                   help="multiturn: conversations from ShareGPT or MT-Bench's two-turn questions")
    w.add_argument("--max-turns", type=int, default=8, help="multiturn: most turns used per conversation")
    w.add_argument("--trace-length-scale", type=float, default=16.0,
                   help="traces: divide input and output lengths by this (Mooncake blocks become 512/scale tokens)")
    w.add_argument("--trace-time-scale", type=float, default=1.0,
                   help="traces: multiply arrival times by this (> 1 replays slower)")
    w.add_argument("--trace-offset", type=int, default=0, help="traces: first row replayed")
    w.add_argument("--no-trace-timestamps", dest="use_trace_timestamps", action="store_false",
                   help="traces: ignore the trace's times and use --request-rate / --max-concurrency arrivals")
    w.add_argument("--max-context-tokens", type=int, default=None,
                   help="fit requests to a server's context: traces clip prompts, sharegpt filters, multiturn ends a "
                        "conversation before a turn that would not fit")
    a = p.add_argument_group("load (a comma-separated list runs a sweep, one run per value)")
    a.add_argument("--request-rate", type=_floats, default=[math.inf],
                   help="requests/s, e.g. 1,2,4; inf sends everything at once (bounded by --max-concurrency)")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma arrivals shape: 1 = Poisson, < 1 burstier, > 1 more regular")
    a.add_argument("--max-concurrency", type=_ints, default=[None],
                   help="most requests in flight, e.g. 1,4,16; with rate inf this is a closed loop")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=None, help="where result JSON, report.md and PNGs go "
                   "(default: bench_results/<workload>-<time>)")
    o.add_argument("--label", default=None, help="name of this run in tables and file names")
    o.add_argument("--slo", default=None, help="SLOs in ms for goodput, e.g. ttft=500,tpot=50 (keys ttft, tpot, e2e)")
    o.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_serve)


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    """One ``BenchConfig`` per (request rate, max concurrency) pair of the sweep."""
    wl = WorkloadConfig(
        name=args.workload, tokenizer=args.tokenizer, dataset_path=args.dataset_path, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, prefix_groups=args.prefix_groups,
        prefix_len=args.prefix_len, multiturn_source=args.multiturn_source, max_turns=args.max_turns,
        trace_length_scale=args.trace_length_scale, trace_time_scale=args.trace_time_scale,
        trace_offset=args.trace_offset, max_context_tokens=args.max_context_tokens)
    slo = parse_slo(args.slo)
    pairs = list(itertools.product(args.request_rate, args.max_concurrency))
    configs = []
    for rate, conc in pairs:
        label = args.label
        if len(pairs) > 1:
            tag = "_".join(([f"rate{rate:g}"] if len(args.request_rate) > 1 else [])
                           + ([f"conc{conc}"] if len(args.max_concurrency) > 1 else []))
            label = f"{args.label}_{tag}" if args.label else tag
        configs.append(BenchConfig(
            base_url=args.base_url, endpoint=args.endpoint, model=args.model, workload=wl,
            num_requests=args.num_requests, request_rate=rate, burstiness=args.burstiness, max_concurrency=conc,
            use_trace_timestamps=args.use_trace_timestamps, seed=args.seed, temperature=args.temperature,
            ignore_eos=args.ignore_eos, request_timeout=args.request_timeout, num_warmups=args.num_warmups,
            api_key=args.api_key,
            slo=slo, disable_tqdm=args.disable_tqdm, label=label))
    return configs


async def run_sweep(configs: list[BenchConfig], out_dir: Path, plots: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Run each point in turn on the same workload, rewriting the report after each; Ctrl-C stops the sweep."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        print("\ninterrupted: finishing with partial results (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError, ValueError):
        logger.debug("no SIGINT handler (not the main thread)")
    workload = build_workload(configs[0].workload, configs[0].num_requests, configs[0].seed)
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for cfg in configs:
            res = await run_benchmark(cfg, workload, stop)
            results.append(res.to_json())
            write_report(results, out_dir, plots=plots, sweep=len(configs) > 1)
            interrupted = res.interrupted
            if interrupted:
                break
    finally:
        if not stop.is_set():
            loop.remove_signal_handler(signal.SIGINT)
    return results, interrupted


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        configs = configs_from_args(args)
    except (ValueError, TierserveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir or f"bench_results/{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    print("bench serve config: " + json.dumps(configs[0].to_json(), default=str), file=sys.stderr)
    try:
        results, interrupted = asyncio.run(run_sweep(configs, out_dir, args.plots))
    except (ValueError, TierserveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"results written to {out_dir}/", file=sys.stderr)
    if interrupted:
        return 130
    dead = [r for r in results if r["summary"]["completed"] == 0 and r["summary"]["failed"] > 0]
    if dead:  # a script or CI must see that the server was never reached (vLLM's bench stops with an error too)
        kinds: dict[str, int] = {}
        for r in dead:
            for kind, count in r["summary"].get("failures", {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
        top = max(kinds, key=lambda k: kinds[k]) if kinds else "unknown"
        hint = (f"the server at {configs[0].base_url} answered {top}: see error_detail in the results"
                if top.startswith("http_") and top != "http_error" else f"is the server up at {configs[0].base_url}?")
        print(f"error: every request failed in {len(dead)} of {len(results)} runs (mostly {top}; {hint})",
              file=sys.stderr)
        return 1
    return 0
