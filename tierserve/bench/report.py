"""Result files of `bench serve`: JSON, a Markdown table and PNG plots (matplotlib, Agg backend).

One run writes ``result.json``, ``report.md`` and ``latency_cdf.png``. A sweep (several request rates or
concurrencies) writes ``result_<label>.json`` per point, ``results.json`` (the list), one ``report.md`` with a row
per point, ``latency_cdf.png`` with a curve per point, and ``sweep.png``: throughput and p99 TTFT against the swept
value. Per-request times in the JSON are seconds; the summary's ``*_ms`` blocks are milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"))


def _is_trace(cfg: dict[str, Any]) -> bool:
    """Whether arrivals followed a trace's own timestamps."""
    return cfg["workload"] in ("mooncake", "azure") and bool(cfg.get("use_trace_timestamps", True))


def run_label(result: dict[str, Any]) -> str:
    cfg = result["config"]
    if cfg.get("label"):
        return str(cfg["label"])
    if _is_trace(cfg):
        return f"trace_x{cfg['workload_args']['trace_time_scale']:g}"
    rate = cfg.get("request_rate")
    parts = [f"rate{rate:g}" if rate is not None else "rateinf"]
    if cfg.get("max_concurrency"):
        parts.append(f"conc{cfg['max_concurrency']}")
    return "_".join(parts)


def write_json(data: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _finite(obj: Any) -> Any:
    """NaN and infinities become ``null``: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _scaling(cfg: dict[str, Any]) -> str:
    w = cfg.get("workload_info") or {}
    if cfg["workload"] in ("mooncake", "azure"):
        return (f"{Path(w.get('file', '')).name} rows {w.get('offset', 0)}..{w.get('offset', 0) + cfg['num_requests']}"
                f", lengths ÷{w.get('length_scale'):g}, time ×{w.get('time_scale'):g}, clipped {w.get('clipped', 0)}")
    return ""


def markdown(results: list[dict[str, Any]]) -> str:
    """A table with one row per run; latencies in ms, throughputs per second."""
    cfg0 = results[0]["config"]
    lines = [f"# bench serve: {cfg0['workload']} workload, model `{cfg0['model']}` at {cfg0['base_url']}", ""]
    slo = ", ".join(f"{k} ≤ {v:g} ms" for k, v in (cfg0.get("slo") or {}).items())
    lines.append(f"Endpoint `{cfg0['endpoint']}`, {cfg0['num_requests']} requests, seed {cfg0['seed']}"
                 + (f", SLO {slo}" if slo else "") + ".")
    if scaling := _scaling(cfg0):
        lines.append(f"Trace replay: {scaling}.")
    lines += ["", "| run | rate | conc | ok | failed | req/s | out tok/s | total tok/s | TTFT mean | TTFT p50 | "
              "TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | goodput | prefix hit |",
              "|" + "---|" * 19]
    for r in results:
        c, s = r["config"], r["summary"]
        rate = "inf" if c["request_rate"] is None else f"{c['request_rate']:g}"
        if _is_trace(c):
            rate = "trace"
        hit = s.get("prefix_cache_hit_rate")
        lines.append("| " + " | ".join([
            run_label(r), rate, str(c.get("max_concurrency") or "—"), str(s["completed"]), str(s["failed"]),
            _fmt(s["request_throughput"], 2), _fmt(s["output_throughput"]), _fmt(s["total_token_throughput"]),
            _fmt(s["ttft_ms"]["mean"]), _fmt(s["ttft_ms"]["median"]), _fmt(s["ttft_ms"]["p99"]),
            _fmt(s["tpot_ms"]["median"]), _fmt(s["tpot_ms"]["p99"]), _fmt(s["itl_ms"]["median"]),
            _fmt(s["itl_ms"]["p99"]), _fmt(s["e2e_ms"]["median"]), _fmt(s["e2e_ms"]["p99"]),
            _fmt(s["goodput"], 2), "—" if hit is None else f"{hit:.1%}"]) + " |")
    lines += ["", "Latencies in ms (TPOT = (E2E − TTFT) / (output tokens − 1), as vLLM); goodput in requests/s "
              "meeting every SLO (DistServe)."]
    for r in results:
        s = r["summary"]
        if s["failed"] or s.get("interrupted"):
            kinds = ", ".join(f"{k}: {n}" for k, n in s["failures"].items())
            note = " (interrupted: partial results)" if s.get("interrupted") else ""
            lines.append(f"- {run_label(r)}: {s['failed']} failed — {kinds}{note}")
    return "\n".join(lines) + "\n"


def _values(result: dict[str, Any], key: str) -> list[float]:
    reqs = [q for q in result["requests"] if q["success"]]
    if key == "itl":
        return [g * 1000 for q in reqs for g in q["itl"]]
    return [q[key] * 1000 for q in reqs if q[key] is not None]


def plot_cdfs(results: list[dict[str, Any]], path: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E (ms), one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, LATENCIES, strict=True):
        for r in results:
            v = np.sort(_values(r, key))
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=run_label(r))
        ax.set_title(f"{title} CDF")
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{results[0]['config']['workload']} workload, {results[0]['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_axis(results: list[dict[str, Any]]) -> str | None:
    """The config key that varies across runs (``request_rate`` or ``max_concurrency``), if any."""
    for key in ("request_rate", "max_concurrency"):
        if len({r["config"][key] for r in results}) > 1:
            return key
    return None


def plot_sweep(results: list[dict[str, Any]], path: Path, axis: str) -> Path:
    """Request/output throughput and p99 TTFT against the swept request rate or concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = [r["config"][axis] for r in results]
    finite = [x for x in raw if x is not None]
    xs = [x if x is not None else (max(finite) * 2 if finite else 1) for x in raw]  # inf rate drawn at 2 x max
    ticks = ["inf" if x is None else f"{x:g}" for x in raw]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((a1, "output_throughput", "output tok/s"), (a2, "request_throughput", "requests/s")):
        ax.plot(xs, [r["summary"][key] for r in results], "o-")
        ax.set_title(title)
    a3.plot(xs, [r["summary"]["ttft_ms"]["p99"] or float("nan") for r in results], "o-", color="C3")
    a3.set_title("p99 TTFT (ms)")
    for ax in (a1, a2, a3):
        ax.set_xlabel(axis.replace("_", " "))
        ax.grid(alpha=0.3)
        if axis == "max_concurrency" or (min(xs) > 0 and max(xs) / min(xs) >= 8):
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, ticks)
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: list[dict[str, Any]], out_dir: Path, plots: bool = True,
                 sweep: bool | None = None) -> list[Path]:
    """Write the JSON, Markdown and PNG files for one run or a sweep (default: sweep if several results);
    returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (len(results) > 1 if sweep is None else sweep):
        paths = [write_json(results[0], out_dir / "result.json")]
    else:
        paths = [write_json(r, out_dir / f"result_{run_label(r)}.json") for r in results]
        paths.append(write_json(results, out_dir / "results.json"))
    md = out_dir / "report.md"
    md.write_text(markdown(results))
    paths.append(md)
    if plots:
        paths.append(plot_cdfs(results, out_dir / "latency_cdf.png"))
        if (axis := sweep_axis(results)) is not None:
            paths.append(plot_sweep(results, out_dir / "sweep.png", axis))
    return paths
