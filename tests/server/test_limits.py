"""Bar 4 and shutdown, on a second server with tight limits: API key (from TIERSERVE_API_KEY), a waiting queue of
one sequence, one running sequence, a 64-token context, two served model names. Its last test stops it with
SIGTERM and expects exit status 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.server_process import ServerProcess
from tierserve.cli import build_parser
from tierserve.server.cli import _server_config

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 64


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("limited") / "server.log"
    srv = ServerProcess(["--max-waiting", "1", "--max-num-seqs", "1", "--max-model-len", str(CONTEXT),
                         "--kv-cache-memory", "64MiB", "--shutdown-timeout", "2",
                         "--served-model-name", "tiny", "--served-model-name", "alias"],
                        log, env={"TIERSERVE_API_KEY": KEY})
    yield srv
    srv.stop()


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_api_key_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERSERVE_API_KEY", "from-env")
    assert _server_config(build_parser().parse_args(["serve"])).api_key == "from-env"
    assert _server_config(build_parser().parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.delenv("TIERSERVE_API_KEY")
    assert _server_config(build_parser().parse_args(["serve"])).api_key is None


def test_api_key(limited: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    missing = httpx.post(f"{limited.url}/v1/completions", json=body)
    assert _error(missing, 401)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    _error(httpx.post(f"{limited.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    _error(httpx.get(f"{limited.url}/v1/models"), 401)
    _error(httpx.post(f"{limited.url}/tokenize", json={"prompt": "hi"}), 401)
    with pytest.raises(openai.AuthenticationError):
        limited.openai("wrong").completions.create(model="tiny", prompt="hi", max_tokens=1)
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/metrics").status_code == 200
    assert limited.openai(KEY).completions.create(model="tiny", prompt="hi", max_tokens=1).choices[0].text


def test_served_model_names(limited: ServerProcess) -> None:
    client = limited.openai(KEY)
    assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
    r = client.completions.create(model="alias", prompt="hi", max_tokens=1)
    assert r.model == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=1)


def test_chat_without_max_tokens_uses_the_remaining_context(limited: ServerProcess) -> None:
    r = limited.openai(KEY).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                    extra_body={"ignore_eos": True})
    assert r.usage is not None and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT


def test_prompt_over_the_context(limited: ServerProcess) -> None:
    r = httpx.post(f"{limited.url}/v1/completions", json={"prompt": "word " * 200}, headers=AUTH)
    assert str(CONTEXT) in _error(r, 400)["message"]


async def _queue_full(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        long = {"prompt": "Count:", "max_tokens": 60, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=long) as running:
            lines = running.aiter_lines()
            assert (await anext(lines)).startswith("data:")  # the first request holds the only running slot
            waiting = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}))
            deadline = time.monotonic() + 20
            queued = 'tierserve:num_requests_waiting{model_name="tiny"} 1.0'
            while queued not in (await client.get("/metrics")).text:
                assert time.monotonic() < deadline, "the second request never queued"
                await asyncio.sleep(0.05)
            full = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            err = _error(full, 503)
            assert err["code"] == "queue_full" and err["type"] == "server_error"
            assert int(full.headers["retry-after"]) >= 1
        # closing the first stream aborts it, and the queued request runs
        assert (await waiting).status_code == 200
        assert (await client.get("/health")).status_code == 200


def test_queue_full_is_503_with_retry_after(limited: ServerProcess) -> None:
    asyncio.run(_queue_full(limited.url))
    metrics = limited.metrics()
    assert metrics["tierserve:request_rejected_total{status=503}"] == 1
    assert metrics["tierserve:num_requests_waiting{}"] == 0 and metrics["tierserve:num_requests_running{}"] == 0


def test_sigterm_exits_0_after_in_flight_requests(limited: ServerProcess) -> None:
    """Runs last: stops the module's server. The in-flight stream (60 tokens, longer than --shutdown-timeout 2)
    either finishes or ends with an error event; either way it ends with [DONE], and the exit status is 0."""
    body = {"prompt": "Count:", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=limited.url, headers=AUTH, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            limited.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    if '"finish_reason": "length"' not in events[-2]:
        assert json.loads(events[-2][6:])["error"]["message"].startswith("the server is shutting down")
    with pytest.raises(httpx.ConnectError):  # no new connections once shutdown started
        httpx.get(f"{limited.url}/health", timeout=5)
    try:
        status = limited.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 30 s after SIGTERM:\n{limited.log()[-2000:]}")
    assert status == 0, limited.log()[-2000:]
    assert time.monotonic() - t0 < 30
    assert "server stopped" in limited.log()
