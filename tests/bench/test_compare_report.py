"""`bench compare` tables and plots from synthetic results: ratios, missing figures, failed peers named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tierserve.bench.peers.report import (
    fmt,
    offline_markdown,
    plot_offline,
    plot_serve,
    ratio,
    serve_markdown,
)

CPU = {"name": "AMD EPYC (family 25, model 17, stepping 1)", "cores": 2, "avx512_bf16": True, "amx": False}


def summary(out_tps: float, ttft: float = 100.0, tpot: float = 20.0) -> dict[str, Any]:
    return {"output_throughput": out_tps, "completed": 8, "failed": 0,
            "ttft_ms": {"median": ttft, "p99": 2 * ttft}, "tpot_ms": {"median": tpot, "p99": 1.5 * tpot}}


def serve_data() -> dict[str, Any]:
    settings = {"workload": "random", "input_len": 200, "output_len": 128, "threads": 2, "model": "smollm2-135m",
                "concurrency": [1, 16]}
    return {"cpu": CPU, "settings": settings, "peers": [
        {"peer": "tierserve", "status": "ok", "version": "0.1.0", "startup_s": 3.0, "points": [
            {"concurrency": 1, "summary": summary(50.0)}, {"concurrency": 16, "summary": summary(300.0)}]},
        {"peer": "llamacpp-native", "status": "ok", "version": "b1", "startup_s": 1.0, "points": [
            {"concurrency": 1, "summary": summary(100.0)},
            {"concurrency": 16, "summary": summary(100.0), "attempts": 2, "cpu": {"other_load_frac": 0.02}}]},
        {"peer": "vllm", "status": "crashed", "error": "exited (code 1)\nImportError: x", "points": [
            {"concurrency": 1, "summary": summary(25.0),
             "cpu": {"other_load_frac": 0.4}, "idle_before": {"ok": False, "idle_fraction": 0.3}}]},
        {"peer": "transformers", "status": "unavailable", "error": "not installed", "points": []},
    ]}


def rows(md: str) -> dict[tuple[str, str], list[str]]:
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            out[(cells[0], cells[1])] = cells
    return out


def test_ratio_and_format() -> None:
    assert ratio(300.0, 100.0) == "3.00"
    assert ratio(None, 100.0) == ratio(100.0, None) == ratio(1.0, 0.0) == ratio(float("nan"), 1.0) == "—"
    assert fmt(None) == fmt(float("inf")) == "—"
    assert fmt(12.345) == "12.3" and fmt(12.6, 0) == "13"


def test_serve_table_ratios_against_tierserve() -> None:
    md = serve_markdown(serve_data())
    r = rows(md)
    assert r[("1", "tierserve")][3] == "1.00"
    assert r[("1", "llamacpp-native")][2:4] == ["100.0", "0.50"]
    assert r[("16", "llamacpp-native")][3] == "3.00"
    assert r[("1", "vllm")][3] == "2.00"  # a crashed peer keeps the points it finished
    assert ("16", "vllm") not in r
    assert r[("1", "tierserve")][4:8] == ["100", "200", "20.0", "30.0"]
    assert "AMD EPYC (family 25, model 17, stepping 1), 2 cores, AVX-512-BF16, no AMX" in md


def test_serve_table_names_failures_and_interference() -> None:
    md = serve_markdown(serve_data())
    assert "- vllm: **crashed**: exited (code 1)\n  ImportError: x" in md
    assert "- transformers: **unavailable**: not installed" in md
    assert "other processes took 40% of the CPU" in md and "still busy (30% idle)" in md
    assert "llamacpp-native at concurrency 16: measured 2 times" in md and "(2% other load)" in md


def test_serve_table_without_tierserve_has_no_ratios() -> None:
    data = serve_data()
    data["peers"] = data["peers"][1:2]
    assert rows(serve_markdown(data))[("1", "llamacpp-native")][3] == "—"


def offline_data() -> dict[str, Any]:
    settings = {"num_prompts": 64, "prompt_len": 256, "max_tokens": 128, "num_runs": 3, "threads": 2,
                "model": "smollm2-135m"}
    return {"cpu": CPU, "settings": settings, "peers": [
        {"peer": "tierserve", "status": "ok", "output_throughput": 400.0, "total_token_throughput": 1200.0,
         "output_throughput_runs": [390.0, 400.0, 410.0], "dtype": "torch.bfloat16", "load_s": 2.0},
        {"peer": "vllm", "status": "ok", "output_throughput": 320.0, "total_token_throughput": 960.0,
         "output_throughput_runs": [320.0], "dtype": "bfloat16", "load_s": 80.0},
        {"peer": "llamacpp-native", "status": "skipped", "error": "no offline batch API"},
    ]}


def test_offline_table() -> None:
    md = offline_markdown(offline_data())
    lines = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in md.splitlines()
                                if ln.startswith("| ") and not ln.startswith("| engine"))}
    assert lines["vllm"][1:4] == ["320.0", "960.0", "1.25"]
    assert lines["tierserve"][4] == "390, 400, 410"
    assert "- llamacpp-native: **skipped**: no offline batch API" in md
    assert "median of 3 runs" in md


def test_plots_are_written(tmp_path: Path) -> None:
    assert plot_serve(serve_data(), tmp_path / "c.png").stat().st_size > 1000
    assert plot_offline(offline_data(), tmp_path / "o.png").stat().st_size > 1000


def test_offline_rounds_take_the_median_of_the_per_round_ratios() -> None:
    """`bench compare --offline --repeats N`: per engine the median over rounds, and as ratio the median of each
    round's own ratio (a round's two engines ran minutes apart; a slow phase of the machine slows both)."""
    from tierserve.bench.compare import aggregate_offline_rounds

    def entry(peer: str, tps: float, status: str = "ok") -> dict[str, Any]:
        if status != "ok":
            return {"peer": peer, "status": status, "error": "exited with code 1"}
        return {"peer": peer, "status": "ok", "output_throughput": tps, "total_token_throughput": 3 * tps,
                "output_throughput_runs": [tps], "dtype": "bfloat16", "load_s": 1.0}

    rounds = [[entry("tierserve", 600), entry("vllm", 500)],
              [entry("vllm", 700), entry("tierserve", 560)],
              [entry("tierserve", 640), entry("vllm", 520)],
              [entry("tierserve", 900), entry("vllm", 0, "crashed")]]
    peers = {p["peer"]: p for p in aggregate_offline_rounds(rounds)}
    assert peers["tierserve"]["output_throughput"] == 620.0  # median of 600, 560, 640, 900
    assert peers["vllm"]["output_throughput"] == 520.0
    assert peers["vllm"]["round_ratios"] == [600 / 500, 560 / 700, 640 / 520]  # the crashed round has no ratio
    data = {**offline_data(), "peers": list(peers.values()), "rounds": rounds}
    md = offline_markdown(data)
    row = next(ln for ln in md.splitlines() if ln.startswith("| vllm"))
    assert "| 1.20 (1.20, 0.80, 1.23) |" in row
    assert "4 interleaved rounds of 3 runs" in md
    assert aggregate_offline_rounds(rounds[:1]) == rounds[0]
    assert next(ln for ln in md.splitlines() if ln.startswith("| tierserve")).split("|")[4].strip() == "1.00"
