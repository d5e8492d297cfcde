"""`bench compare --repeats N` (interleaved rounds, medians, per-round ratios) and `bench drift` (re-run check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tierserve.bench import compare
from tierserve.bench.peers.report import serve_markdown
from tierserve.bench.peers.rounds import aggregate_rounds, drift, load_run, median_summary, ratios
from tierserve.bench.peers.serving import CompareConfig
from tierserve.cli import main

from .test_compare_report import CPU, rows, summary

SETTINGS = {"workload": "random", "input_len": 200, "output_len": 128, "threads": 2, "model": "smollm2-135m",
            "concurrency": [1, 16]}


def entry(name: str, tps: dict[int, float], status: str = "ok") -> dict[str, Any]:
    if status != "ok":
        return {"peer": name, "status": status, "error": "exited (code 9)", "points": []}
    return {"peer": name, "status": "ok", "version": "v", "startup_s": 2.0,
            "points": [{"concurrency": c, "num_requests": 16, "summary": summary(v, ttft=v)} for c, v in tps.items()]}


def test_median_summary_sums_counts_and_takes_medians() -> None:
    s = median_summary([summary(10.0, ttft=1.0), summary(30.0, ttft=5.0), summary(20.0, ttft=2.0)])
    assert s["output_throughput"] == 20.0
    assert s["ttft_ms"] == {"median": 2.0, "p99": 4.0}
    assert s["completed"] == 24 and s["failed"] == 0
    merged = median_summary([{"failures": {"timeout": 1}, "interrupted": False},
                             {"failures": {"timeout": 2, "http_500": 1}, "interrupted": True}])
    assert merged == {"failures": {"timeout": 3, "http_500": 1}, "interrupted": True}


def three_rounds() -> list[list[dict[str, Any]]]:
    # tierserve ÷ llama.cpp at c=1 per round: 100/50 = 2.0, 60/40 = 1.5, 90/100 = 0.9 → median 1.5,
    # while median ÷ median = 90 / 50 = 1.8: the table must show the paired figure
    return [
        [entry("tierserve", {1: 100.0, 16: 300.0}), entry("llamacpp-native", {1: 50.0, 16: 100.0})],
        [entry("tierserve", {1: 60.0, 16: 310.0}), entry("llamacpp-native", {1: 40.0, 16: 100.0})],
        [entry("tierserve", {1: 90.0, 16: 290.0}), entry("llamacpp-native", {}, status="crashed")],
    ]


def test_aggregate_pairs_rounds_and_keeps_failed_rounds_visible() -> None:
    peers = aggregate_rounds(three_rounds())
    ts, lc = peers
    assert ts["rounds_ok"] == 3 and lc["rounds_ok"] == 2 and lc["rounds_run"] == 3
    assert lc["round_errors"] == ["round 3: crashed: exited (code 9)"]
    p1 = {p["concurrency"]: p for p in lc["points"]}[1]
    assert p1["rounds"] == [50.0, 40.0, None] and p1["summary"]["output_throughput"] == 45.0
    assert p1["num_requests"] == 32 and p1["summary"]["completed"] == 16
    r = ratios({"peers": peers})
    assert r[(1, "llamacpp-native")] == pytest.approx(1.75)  # median of 2.0 and 1.5 (round 3 has no pair)
    assert r[(16, "llamacpp-native")] == pytest.approx(3.05)
    assert aggregate_rounds(three_rounds()[:1]) == three_rounds()[0]  # one round: entries unchanged


def test_table_with_rounds() -> None:
    data = {"cpu": CPU, "settings": {**SETTINGS, "repeats": 3}, "rounds": three_rounds(),
            "peers": aggregate_rounds(three_rounds())}
    md = serve_markdown(data)
    assert "median of 3 interleaved rounds" in md
    r = rows(md)
    assert r[("1", "llamacpp-native")][2:4] == ["45.0", "1.75"]
    assert r[("1", "llamacpp-native")][-1] == "50, 40, —"
    assert r[("1", "tierserve")][-1] == "100, 60, 90"
    assert "ran in 2 of 3 rounds" in md and "round 3: crashed" in md


def test_run_compare_interleaves_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, Path]] = []
    tps = {"tierserve": 100.0, "llamacpp-native": 50.0}

    class Ready:
        def __init__(self, name: str) -> None:
            self.name = name

    def fake_prepare(name: str, settings: Any, install: bool) -> tuple[Any, str | None]:
        return (Ready(name), None) if name in tps else (None, "not installed")

    def fake_serve(peer: Any, cfg: Any, slices: Any, out_dir: Path) -> dict[str, Any]:
        order.append((peer.name, out_dir))
        return entry(peer.name, {c: tps[peer.name] + len(order) for c in cfg.concurrency})

    monkeypatch.setattr(compare, "prepare", fake_prepare)
    monkeypatch.setattr(compare, "serve_peer", fake_serve)
    monkeypatch.setattr(compare, "workload_slices", lambda cfg: {})
    cfg = CompareConfig(peers=["tierserve", "llamacpp-native", "vllm"], concurrency=[1, 4], repeats=2,
                        output_dir=tmp_path)
    data = compare.run_compare(cfg)
    assert [n for n, _ in order] == ["tierserve", "llamacpp-native"] * 2
    assert [d.name for _, d in order] == ["round1", "round1", "round2", "round2"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["settings"]["repeats"] == 2 and len(saved["rounds"]) == 2
    assert [p["peer"] for p in data["peers"]] == ["tierserve", "llamacpp-native", "vllm"]
    assert data["peers"][2]["status"] == "unavailable"
    assert data["peers"][0]["points"][0]["rounds"] == [101.0, 103.0]
    assert (tmp_path / "compare.md").read_text().count("| 1 | ") == 2
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def write_run(path: Path, tps: dict[str, float]) -> Path:
    path.mkdir()
    data = {"kind": "serve", "cpu": CPU, "settings": SETTINGS,
            "peers": [entry(name, {1: v, 16: 2 * v}) for name, v in tps.items()]}
    (path / "compare.json").write_text(json.dumps(data))
    return path


def test_drift_between_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a", {"tierserve": 100.0, "vllm": 100.0, "llamacpp-native": 50.0})
    b = write_run(tmp_path / "b", {"tierserve": 100.0, "vllm": 95.0, "llamacpp-native": 60.0})
    d = {(r["concurrency"], r["engine"]): r for r in drift(load_run(a), load_run(b / "compare.json"))}
    assert d[(1, "vllm")]["first"] == 1.0 and d[(1, "vllm")]["change"] == pytest.approx(100 / 95 - 1)
    assert d[(16, "llamacpp-native")]["change"] == pytest.approx(50 / 60 - 1)
    assert main(["bench", "drift", str(a), str(b)]) == 1  # llama.cpp's ratio moved 16.7%
    out = capsys.readouterr().out
    assert "2 of 4 ratios within ±10%" in out and "-16.7%" in out
    assert main(["bench", "drift", str(a), str(b), "--tolerance", "0.2"]) == 0


def test_drift_rejects_what_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    offline = tmp_path / "offline.json"
    offline.write_text(json.dumps({"kind": "offline", "peers": []}))
    good = write_run(tmp_path / "good", {"tierserve": 1.0, "vllm": 1.0})
    for path, why in ((bad, "not JSON"), (offline, "not a served"), (tmp_path / "missing", "no such file")):
        assert main(["bench", "drift", str(path), str(good)]) == 2
        err = capsys.readouterr().err
        assert why in err and path.name in err
