"""Metric definitions on synthetic timings with known answers (vLLM's `bench serve` and DistServe goodput)."""

from __future__ import annotations

import pytest

from tierserve.bench.metrics import RequestRecord, parse_slo, stats_ms, summarize


def records() -> list[RequestRecord]:
    r1 = RequestRecord(prompt_tokens=10, output_tokens=10, ttft=0.1, itl=[0.1] * 9, e2e=1.0, success=True)
    r2 = RequestRecord(prompt_tokens=20, output_tokens=5, ttft=0.3, itl=[0.2] * 4, e2e=1.1, success=True)
    r3 = RequestRecord(prompt_tokens=30, output_tokens=1, ttft=0.5, e2e=0.5, success=True)
    r4 = RequestRecord(prompt_tokens=40, error="connect_error")
    r5 = RequestRecord(prompt_tokens=50, error="http_500")
    r6 = RequestRecord(prompt_tokens=60, error="connect_error")
    return [r1, r2, r3, r4, r5, r6]


def test_tpot_is_e2e_minus_ttft_over_tokens_minus_one() -> None:
    r1, r2, r3, r4, *_ = records()
    assert r1.tpot == pytest.approx(0.9 / 9)
    assert r2.tpot == pytest.approx(0.8 / 4)
    assert r3.tpot is None  # one output token: undefined
    assert r4.tpot is None  # failed


def test_summary_counts_and_throughputs() -> None:
    s = summarize(records(), duration_s=2.0)
    assert s["completed"] == 3 and s["failed"] == 3
    assert s["failures"] == {"connect_error": 2, "http_500": 1}
    assert s["total_input_tokens"] == 60 and s["total_output_tokens"] == 16
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.0)
    assert s["total_token_throughput"] == pytest.approx(38.0)
    assert s["goodput"] is None


def test_latency_statistics_in_ms() -> None:
    s = summarize(records(), duration_s=2.0)
    # TTFT 100, 300, 500 ms; numpy linear percentiles: p90 at rank 1.8, p99 at rank 1.98
    assert s["ttft_ms"] == pytest.approx({"mean": 300.0, "median": 300.0, "p90": 460.0, "p99": 496.0})
    # TPOT only where output > 1: 100, 200 ms
    assert s["tpot_ms"] == pytest.approx({"mean": 150.0, "median": 150.0, "p90": 190.0, "p99": 199.0})
    # ITL pools every gap: nine of 100 ms, four of 200 ms
    assert s["itl_ms"] == pytest.approx({"mean": 1700.0 / 13, "median": 100.0, "p90": 200.0, "p99": 200.0})
    assert s["e2e_ms"]["mean"] == pytest.approx(2600.0 / 3)
    assert s["e2e_ms"]["median"] == pytest.approx(1000.0)


def test_goodput_requires_every_slo() -> None:
    recs = records()
    # r1 meets both; r2 misses TPOT (200 > 150); r3 misses TTFT (500 > 400)
    assert summarize(recs, 2.0, {"ttft": 400, "tpot": 150})["goodput"] == pytest.approx(0.5)
    # an SLO equal to the value is met (500 <= 500)
    assert summarize(recs, 2.0, {"ttft": 500})["goodput"] == pytest.approx(1.5)
    # a one-token answer has TPOT 0 for goodput, as in vLLM
    assert summarize(recs, 2.0, {"tpot": 50})["goodput"] == pytest.approx(0.5)
    assert summarize(recs, 2.0, {"e2e": 1050})["goodput"] == pytest.approx(1.0)


def test_empty_run() -> None:
    s = summarize([RequestRecord(prompt_tokens=5, error="timeout")], 1.0, {"ttft": 1})
    assert s["completed"] == 0 and s["goodput"] == 0.0 and s["request_throughput"] == 0.0
    assert s["ttft_ms"] == {"mean": None, "median": None, "p90": None, "p99": None}
    assert stats_ms([]) == s["ttft_ms"]


def test_parse_slo() -> None:
    assert parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo("e2el=2000") == {"e2e": 2000.0}
    assert parse_slo(None) == {}
    for bad in ("ttft", "ttft=abc", "speed=3", "tpot=-1"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)
