"""The client and runner against small real servers with known delays or faults (see fake_server.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tierserve.bench.runner import BenchConfig, BenchResult, run_benchmark
from tierserve.bench.sources import count_tokens, load_tokenizer
from tierserve.bench.workloads import WorkloadConfig

from .fake_server import FakeServer, free_port


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(ttft_s=0.05, gap_s=0.01, slow_s=30.0) as s:
        yield s


def run(base_url: str, n: int = 4, out: int = 5, **kw: object) -> BenchResult:
    wl = kw.pop("workload", WorkloadConfig(name="random", input_len=32, output_len=out))
    cfg = BenchConfig(base_url=base_url, workload=wl, num_requests=n, disable_tqdm=True, **kw)  # type: ignore[arg-type]
    return asyncio.run(run_benchmark(cfg))


def test_timings_tokens_and_prefix_cache_rate(server: FakeServer) -> None:
    res = run(server.url("ok"), n=4, out=5, max_concurrency=2)
    s = res.summary()
    assert s["completed"] == 4 and s["failed"] == 0 and res.model == "fake-model"
    for r in res.records:
        assert r.success and r.output_tokens == 5 and len(r.itl) == 4
        assert 0.045 <= r.ttft <= 0.5  # type: ignore[operator]
        # 10 ms per gap at the server; one gap may look shorter when the OS delivers two chunks close together
        assert all(0 <= g <= 0.3 for g in r.itl) and 0.036 <= sum(r.itl) <= 0.6
        assert r.e2e == pytest.approx(r.ttft + sum(r.itl), abs=0.05)  # type: ignore[operator]
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4)  # type: ignore[operator]
        assert r.prompt_tokens in {len(q["prompt"].split()) for q in server.requests}  # the server's usage
    assert s["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert server.max_inflight <= 2
    assert s["output_throughput"] == pytest.approx(20 / s["duration_s"])


def test_chat_role_chunk_is_not_first_token_and_usage_fallback(server: FakeServer) -> None:
    res = run(server.url("nousage"), n=2, out=3, endpoint="/v1/chat/completions", num_warmups=0)
    tok = load_tokenizer("smollm2-135m")
    for r in res.records:
        assert r.success and r.ttft is not None and r.ttft >= 0.045
        assert r.generated_text.startswith(" r") and r.output_tokens == count_tokens(tok, r.generated_text)


@pytest.mark.parametrize(("mode", "kind"), [
    ("error500", "http_500"), ("drop", "connection_closed"), ("errorevent", "server_error_event"),
    ("garbage", "invalid_response"),
])
def test_server_faults_are_failures_by_kind(server: FakeServer, mode: str, kind: str) -> None:
    res = run(server.url(mode), n=3, out=4)
    s = res.summary()
    assert s["completed"] == 0 and s["failures"] == {kind: 3}


def test_refused_connections_and_flaky_server(server: FakeServer) -> None:
    s = run(f"http://127.0.0.1:{free_port()}", n=3).summary()
    assert s["failures"] == {"connect_error": 3} and s["ttft_ms"]["mean"] is None
    s = run(server.url("flaky"), n=6, out=3, num_warmups=0, max_concurrency=1).summary()
    assert s["completed"] == 4 and s["failures"] == {"http_500": 2}


def test_request_timeout_never_hangs(server: FakeServer) -> None:
    t = time.monotonic()
    s = run(server.url("slow"), n=3, request_timeout=0.4, num_warmups=0).summary()
    assert s["failures"] == {"timeout": 3} and time.monotonic() - t < 5


def test_multiturn_feeds_back_the_actual_answer(server: FakeServer) -> None:
    wl = WorkloadConfig(name="multiturn", multiturn_source="mtbench", output_len=3)
    before = len(server.requests)
    res = run(server.url("ok"), n=4, workload=wl, endpoint="/v1/chat/completions", num_warmups=0,
              max_concurrency=1)
    assert res.summary()["completed"] == 4
    sent = [r["messages"] for r in server.requests[before:]]
    assert sorted(len(m) for m in sent) == [1, 1, 3, 3]
    for second in (m for m in sent if len(m) == 3):
        first = next(r for r in res.records if r.turn == 0 and r.generated_text == second[1]["content"])
        assert second[1]["role"] == "assistant" and first.generated_text.startswith(" r")
        assert [second[0]] in sent  # turn 1 was sent alone, then repeated as history


def test_multiturn_completions_and_aborted_conversations(server: FakeServer) -> None:
    wl = WorkloadConfig(name="multiturn", multiturn_source="mtbench", output_len=3)
    before = len(server.requests)
    res = run(server.url("ok"), n=2, workload=wl, num_warmups=0)
    p1, p2 = (r["prompt"] for r in server.requests[before:])
    answer = res.records[0].generated_text
    assert p2.startswith(p1 + answer) and p2.endswith("Assistant:")
    s = run(server.url("error500"), n=4, workload=wl, num_warmups=0).summary()
    assert s["failures"] == {"http_500": 2, "conversation_aborted": 2}


def test_poisson_pacing(server: FakeServer) -> None:
    res = run(server.url("ok"), n=6, out=2, request_rate=10.0, seed=1, num_warmups=0)
    sends = sorted(r.send_time for r in res.records)
    assert sends[-1] >= 0.1  # paced, not all at once
    assert res.to_json()["config"]["request_rate"] == 10.0


def test_stop_event_returns_partial_results(server: FakeServer) -> None:
    async def go() -> BenchResult:
        stop = asyncio.Event()
        cfg = BenchConfig(base_url=server.url("slow"), num_requests=3, num_warmups=0, disable_tqdm=True,
                          workload=WorkloadConfig(name="random", input_len=16, output_len=2))
        asyncio.get_running_loop().call_later(0.5, stop.set)
        return await run_benchmark(cfg, stop=stop)

    t = time.monotonic()
    res = asyncio.run(go())
    assert res.interrupted and time.monotonic() - t < 5
    assert res.summary()["failures"] == {"interrupted": 3}
