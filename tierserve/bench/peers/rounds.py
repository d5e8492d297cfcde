"""Repeated rounds of a served `bench compare` (``--repeats N``), and the drift of its ratios between two runs.

One pass per engine cannot promise stable ratios on a shared machine: each engine's own throughput moves several
percent from one pass to the next, so a ratio of two such figures moves twice that (BENCHMARKS.md measured up to
14.5%). With ``--repeats N`` the engines run interleaved N times (A B C, A B C, ...): each round pairs figures
measured minutes apart, and the report takes medians over rounds — per engine for every statistic, and for the
ratios the median of the per-round ratios, so that a slow drift of the machine during the invocation cancels.

``drift`` compares the ratios of two such invocations (the harness's "re-running gives ratios within ±10%").
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

BASELINE = "tierserve"
COUNT_KEYS = frozenset({"completed", "failed", "total_input_tokens", "total_output_tokens"})
"""Summary fields that are counts: summed over rounds (every other number is the median over rounds)."""


def _median_of(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return statistics.median(nums) if nums else None


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from several rounds' summaries: counts summed, failures by kind summed, every other number (and
    every number inside a nested block such as ``ttft_ms``) the median over the rounds that have it."""
    out: dict[str, Any] = {}
    keys = [k for s in summaries for k in s]
    for key in dict.fromkeys(keys):
        values = [s[key] for s in summaries if key in s]
        if key in COUNT_KEYS:
            out[key] = sum(int(v) for v in values if isinstance(v, (int, float)))
        elif key == "failures":
            merged: dict[str, int] = {}
            for v in values:
                for kind, n in (v or {}).items():
                    merged[kind] = merged.get(kind, 0) + int(n)
            out[key] = merged
        elif all(isinstance(v, dict) for v in values):
            out[key] = median_summary(values)
        elif any(isinstance(v, bool) for v in values):
            out[key] = any(bool(v) for v in values)
        else:
            out[key] = _median_of(values)
    return out


def _ok_points(entry: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["concurrency"]: p for p in entry.get("points", []) if p.get("summary")}


def aggregate_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per engine, one entry over all rounds (``compare.json``'s ``peers``); a single round is returned as is.

    An aggregated point carries ``rounds``: per round (in order) the output tok/s, or None where the engine had no
    figure in that round, so that ratios can pair figures of the same round."""
    if len(rounds) == 1:
        return rounds[0]
    names = list(dict.fromkeys(e["peer"] for rnd in rounds for e in rnd))
    out = []
    for name in names:
        entries = [next((e for e in rnd if e["peer"] == name), None) for rnd in rounds]
        present = [e for e in entries if e is not None]
        ok = [e for e in present if e["status"] == "ok"]
        first = (ok or present)[0]
        agg: dict[str, Any] = {k: v for k, v in first.items() if k not in ("points", "log", "idle_before_start")}
        agg["status"] = "ok" if ok else first["status"]
        agg["rounds_ok"] = len(ok)
        agg["rounds_run"] = len(present)
        errors = [f"round {i + 1}: {e['status']}: {e.get('error', '')}" for i, e in enumerate(entries)
                  if e is not None and e["status"] != "ok"]
        if errors:
            agg["round_errors"] = errors
        if ok and all(e.get("startup_s") is not None for e in ok):
            agg["startup_s"] = statistics.median(e["startup_s"] for e in ok)
        per_round = [_ok_points(e) if e is not None else {} for e in entries]
        concs = sorted({c for pts in per_round for c in pts})
        agg["points"] = []
        for conc in concs:
            pts = [pts.get(conc) for pts in per_round]
            have = [p for p in pts if p is not None]
            agg["points"].append({
                "concurrency": conc,
                "num_requests": sum(p.get("num_requests", 0) for p in have),
                "summary": median_summary([p["summary"] for p in have]),
                "rounds": [None if p is None else p["summary"].get("output_throughput") for p in pts],
                "result_files": [p.get("result_file") for p in have],
            })
        out.append(agg)
    return out


def round_ratios(ours: list[float | None], theirs: list[float | None]) -> list[float]:
    """tierserve ÷ engine for each round where both have a figure."""
    return [a / b for a, b in zip(ours, theirs, strict=False)
            if a is not None and b is not None and b > 0 and math.isfinite(a) and math.isfinite(b)]


def point_ratio(base: dict[str, Any] | None, point: dict[str, Any]) -> float | None:
    """tierserve ÷ engine output tok/s at one point: the median of the per-round ratios when both points carry
    rounds, else the plain ratio of the two figures."""
    if base is None:
        return None
    if "rounds" in base and "rounds" in point:
        r = round_ratios(base["rounds"], point["rounds"])
        return statistics.median(r) if r else None
    a, b = base["summary"].get("output_throughput"), point["summary"].get("output_throughput")
    if a is None or b is None or b <= 0:
        return None
    return float(a) / float(b)


def ratios(data: dict[str, Any]) -> dict[tuple[int, str], float]:
    """``(concurrency, engine) → tierserve ÷ engine`` for every engine point that has a figure."""
    base = next((_ok_points(p) for p in data["peers"] if p["peer"] == BASELINE), {})
    out: dict[tuple[int, str], float] = {}
    for peer in data["peers"]:
        if peer["peer"] == BASELINE:
            continue
        for conc, point in _ok_points(peer).items():
            r = point_ratio(base.get(conc), point)
            if r is not None:
                out[(conc, peer["peer"])] = r
    return out


def load_run(path: Path) -> dict[str, Any]:
    """A served `bench compare` result: its ``compare.json`` or the folder holding it."""
    file = path / "compare.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file}: no such file (give a `bench compare` output folder or its compare.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != "serve" or not isinstance(data.get("peers"), list):
        raise ValueError(f"{file}: not a served `bench compare` result (kind {data.get('kind')!r})"
                         if isinstance(data, dict) else f"{file}: not a served `bench compare` result")
    return data


def drift(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio present in both runs: its value in each and the relative change from the first to the second."""
    a, b = ratios(first), ratios(second)
    return [{"concurrency": conc, "engine": engine, "first": a[(conc, engine)], "second": b[(conc, engine)],
             "change": b[(conc, engine)] / a[(conc, engine)] - 1.0}
            for conc, engine in sorted(set(a) & set(b))]


def drift_markdown(rows: list[dict[str, Any]], tolerance: float, names: tuple[str, str]) -> str:
    lines = [f"tierserve ÷ engine, output tok/s: {names[0]} → {names[1]} (tolerance ±{100 * tolerance:.0f}%)", "",
             "| concurrency | engine | first | second | change | within |", "|---:|---|---:|---:|---:|---|"]
    for r in rows:
        ok = abs(r["change"]) <= tolerance
        lines.append(f"| {r['concurrency']} | {r['engine']} | {r['first']:.2f} | {r['second']:.2f} "
                     f"| {100 * r['change']:+.1f}% | {'yes' if ok else '**no**'} |")
    inside = sum(abs(r["change"]) <= tolerance for r in rows)
    worst = max((abs(r["change"]) for r in rows), default=0.0)
    lines += ["", f"{inside} of {len(rows)} ratios within ±{100 * tolerance:.0f}%; largest change "
                  f"{100 * worst:.1f}%."]
    return "\n".join(lines) + "\n"
