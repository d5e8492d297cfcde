"""Side-by-side tables (Markdown) and plots (PNG) of `bench compare`, from its JSON (``compare.json`` /
``offline.json``). Ratios are tierserve ÷ engine: above 1 tierserve has the higher figure (better for
throughput, worse for latency); tierserve's own row reads 1.00; "—" where either side has no figure.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from tierserve.bench.peers.machine import cpu_summary
from tierserve.bench.peers.rounds import BASELINE, point_ratio

__all__ = ["BASELINE", "OTHER_LOAD_WARN", "offline_markdown", "plot_offline", "plot_serve", "serve_markdown"]
OTHER_LOAD_WARN = 0.10
"""Share of the machine's CPU time taken by other processes during a run above which the report flags it."""


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs <= 0 or not math.isfinite(ours) or not math.isfinite(theirs):
        return "—"
    return f"{ours / theirs:.2f}"


def _stat(summary: dict[str, Any], key: str, stat: str) -> float | None:
    block = summary.get(key) or {}
    v = block.get(stat)
    return float(v) if isinstance(v, (int, float)) else None


def _points(peer: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["concurrency"]: p for p in peer.get("points", []) if p.get("summary")}


def serve_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    repeats = int(s.get("repeats", 1))
    how = (f"median of {repeats} interleaved rounds (ratio: median of the per-round ratios)" if repeats > 1
           else "one pass per engine")
    per_round = " output tok/s per round |" if repeats > 1 else ""
    lines = [f"### Served: {s['workload']} workload, {s['input_len']}-token prompts, {s['output_len']} tokens out, "
             f"closed loop; {s['threads']} threads; {how}",
             "", f"CPU: {cpu_summary(data['cpu'])}. Model: {s['model']}. Ratio = tierserve ÷ engine "
             "(output tok/s: > 1 means tierserve is faster).", "",
             "| concurrency | engine | output tok/s | tierserve ÷ engine | TTFT p50 (ms) | TTFT p99 (ms) "
             f"| TPOT p50 (ms) | TPOT p99 (ms) | completed / failed |{per_round}",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if repeats > 1 else "")]
    base = next((_points(p) for p in data["peers"] if p["peer"] == BASELINE), {})
    for conc in s["concurrency"]:
        for peer in data["peers"]:
            point = _points(peer).get(conc)
            if point is None:
                continue
            sm = point["summary"]
            r = point_ratio(base.get(conc), point)
            rounds = ""
            if repeats > 1:
                rounds = " " + ", ".join(fmt(v, 0) for v in point.get("rounds", [])) + " |"
            lines.append(
                f"| {conc} | {peer['peer']} | {fmt(sm.get('output_throughput'))} "
                f"| {fmt(r, 2)} | {fmt(_stat(sm, 'ttft_ms', 'median'), 0)} "
                f"| {fmt(_stat(sm, 'ttft_ms', 'p99'), 0)} | {fmt(_stat(sm, 'tpot_ms', 'median'))} "
                f"| {fmt(_stat(sm, 'tpot_ms', 'p99'))} | {sm.get('completed', 0)} / {sm.get('failed', 0)} |{rounds}")
    rounds_data = data.get("rounds") or [data["peers"]]
    load = []
    for i, rnd in enumerate(rounds_data):
        load += _load_notes(rnd, f"round {i + 1}, " if len(rounds_data) > 1 else "")
    lines += ["", *_engine_notes(data["peers"]), *_interference(load)]
    return "\n".join(lines) + "\n"


def _interference(notes: list[str]) -> list[str]:
    return ["", "Interference:", *notes] if notes else []


def _engine_notes(peers: list[dict[str, Any]]) -> list[str]:
    out = ["Engines:"]
    for p in peers:
        if p["status"] == "ok":
            start = f", healthy {p['startup_s']:.1f} s after launch" if p.get("startup_s") is not None else ""
            if "rounds_run" in p:
                start += f" (median); ran in {p['rounds_ok']} of {p['rounds_run']} rounds"
            out.append(f"- {p['peer']}: {p.get('version', '')}; {p.get('weights', '')}{start}")
            out += [f"  - {e.strip()}" for e in p.get("round_errors", [])]
        else:
            error = str(p.get("error", "")).strip().replace("\n", "\n  ")
            out.append(f"- {p['peer']}: **{p['status']}**: {error}")
    return out


def _load_notes(peers: list[dict[str, Any]], prefix: str = "") -> list[str]:
    notes = []
    for p in peers:
        items = p.get("points") or ([p] if "cpu" in p else [])
        for point in items:
            at = f" at concurrency {point['concurrency']}" if "concurrency" in point else ""
            label = f"{prefix}{p['peer']}{at}"
            cpu, idle = point.get("cpu") or {}, point.get("idle_before") or {}
            if cpu.get("other_load_frac", 0.0) > OTHER_LOAD_WARN:
                notes.append(f"- {label}: other processes took {100 * cpu['other_load_frac']:.0f}% of the CPU "
                             "during the run; its figures are low by up to that much")
            if point.get("attempts", 1) > 1:
                notes.append(f"- {label}: measured {point['attempts']} times (other load); the least disturbed "
                             f"attempt is shown ({100 * cpu.get('other_load_frac', 0.0):.0f}% other load)")
            if idle and not idle.get("ok", True):
                notes.append(f"- {label}: the machine was still busy ({100 * (idle.get('idle_fraction') or 0):.0f}% "
                             f"idle) when the run started")
    return notes


def offline_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    rounds = len(data.get("rounds") or []) or 1
    how = (f"median of {s['num_runs']} runs" if rounds == 1 else
           f"{rounds} interleaved rounds of {s['num_runs']} runs: medians of the rounds' medians")
    what = ("Ratio = tierserve ÷ engine" if rounds == 1 else
            "Ratio = the median of the rounds' ratios (tierserve ÷ engine, each round's pair measured minutes "
            "apart), the rounds' ratios in brackets")
    lines = [f"### Offline: {s['num_prompts']} prompts × {s['prompt_len']} tokens, {s['max_tokens']} new, greedy, "
             f"EOS ignored; {how}; {s['threads']} threads",
             "", f"CPU: {cpu_summary(data['cpu'])}. Model: {s['model']}. {what}.", "",
             "| engine | output tok/s | total tok/s | tierserve ÷ engine | output tok/s per run | dtype | load (s) |",
             "|---|---:|---:|---:|---|---|---:|"]
    ok = [p for p in data["peers"] if p["status"] == "ok"]
    ours = next((p["output_throughput"] for p in ok if p["peer"] == BASELINE), None)
    for p in ok:
        runs = ", ".join(f"{v:.0f}" for v in p.get("output_throughput_runs", []))
        rr = p.get("round_ratios") if p["peer"] != BASELINE else None
        r = (f"{statistics.median(rr):.2f} ({', '.join(f'{v:.2f}' for v in rr)})" if rr
             else ratio(ours, p["output_throughput"]))
        lines.append(f"| {p['peer']} | {fmt(p['output_throughput'])} | {fmt(p['total_token_throughput'])} "
                     f"| {r} | {runs} | {p.get('dtype', '')} "
                     f"| {fmt(p.get('load_s'))} |")
    lines += ["", *_engine_notes(data["peers"]), *_interference(_load_notes(data["peers"]))]
    return "\n".join(lines) + "\n"


def plot_serve(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("output_throughput", None, "output tok/s"), ("ttft_ms", "median", "TTFT p50 (ms)"),
              ("tpot_ms", "median", "TPOT p50 (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for peer in data["peers"]:
        points = _points(peer)
        concs = sorted(points)
        if not concs:
            continue
        for ax, (key, stat, _) in zip(axes, panels, strict=True):
            ys = [points[c]["summary"].get(key) if stat is None else _stat(points[c]["summary"], key, stat)
                  for c in concs]
            ax.plot(concs, [y if y is not None else math.nan for y in ys], marker="o", label=peer["peer"],
                    linewidth=2.5 if peer["peer"] == BASELINE else 1.5)
    for ax, (key, _, label) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(data["settings"]["concurrency"], [str(c) for c in data["settings"]["concurrency"]])
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(label)
        if key != "output_throughput":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    s = data["settings"]
    fig.suptitle(f"{s['model']}, {s['input_len']}-token prompts → {s['output_len']} tokens, {s['threads']} threads — "
                 f"{cpu_summary(data['cpu'])}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_offline(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in data["peers"] if p["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [p["peer"] for p in ok]
    bars = ax.bar(names, [p["output_throughput"] for p in ok],
                  color=["tab:blue" if n == BASELINE else "tab:gray" for n in names])
    ax.bar_label(bars, fmt="%.0f")
    rounds = len(data.get("rounds") or [])
    ax.set_ylabel("output tok/s (median)" if rounds < 2 else f"output tok/s (median of {rounds} interleaved rounds)")
    s = data["settings"]
    ax.set_title(f"offline {s['num_prompts']}×{s['prompt_len']} → {s['max_tokens']}, {s['threads']} threads\n"
                 f"{cpu_summary(data['cpu'])}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
