"""Bar 5: /metrics parses with prometheus_client's parser and its counters move as requests complete; each request
writes one structured log line."""

from __future__ import annotations

import time

import httpx
import openai

from tests.server.server_process import ServerProcess

MODEL = "smollm2-135m"
ENGINE_METRICS = ["tierserve:num_requests_running{}", "tierserve:num_requests_waiting{}",
                  "tierserve:kv_cache_usage_perc{}", "tierserve:num_free_kv_blocks{}", "tierserve:num_kv_blocks{}",
                  "tierserve:num_preemptions_total{}", "tierserve:prompt_tokens_total{}",
                  "tierserve:generation_tokens_total{}"]
HISTOGRAMS = ["tierserve:time_to_first_token_seconds", "tierserve:time_per_output_token_seconds",
              "tierserve:e2e_request_latency_seconds"]


def test_metrics_parse_and_move(server: ServerProcess, client: openai.OpenAI) -> None:
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = server.metrics()
    for name in ENGINE_METRICS:
        assert name in before, name
    assert before["tierserve:num_requests_running{}"] == 0 and before["tierserve:kv_cache_usage_perc{}"] == 0

    done = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    stopped = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=20, temperature=0,
                                        stop=[","])
    assert done.choices[0].finish_reason == "length" and stopped.choices[0].finish_reason == "stop"
    assert done.usage is not None and stopped.usage is not None
    after = server.metrics()

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved("tierserve:request_success_total{finished_reason=length}") == 1
    assert moved("tierserve:request_success_total{finished_reason=stop}") == 1
    assert moved("tierserve:generation_tokens_total{}") == (done.usage.completion_tokens
                                                            + stopped.usage.completion_tokens)
    assert moved("tierserve:prompt_tokens_total{}") == done.usage.prompt_tokens + stopped.usage.prompt_tokens
    for h in HISTOGRAMS:
        assert moved(f"{h}_count{{}}") == 2, h
        assert moved(f"{h}_sum{{}}") > 0, h
        assert after[f"{h}_bucket{{le=+Inf}}"] == after[f"{h}_count{{}}"]
    assert after["tierserve:num_requests_running{}"] == 0 and after["tierserve:num_requests_waiting{}"] == 0

    httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert server.metrics()["tierserve:request_rejected_total{status=400}"] >= 1


def test_one_log_line_per_request(server: ServerProcess, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if f"id={r.id} " in line]
        if lines:
            break
        time.sleep(0.1)
    assert len(lines) == 1
    assert "INFO" in lines[0] and f"completion_tokens={r.usage.completion_tokens}" in lines[0]  # type: ignore[union-attr]
    assert "latency=" in lines[0] and "ttft=" in lines[0]
