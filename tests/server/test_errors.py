"""Bar 4 (main server): bad input gets the right status and an OpenAI-shaped error, and the server stays healthy;
a client that disconnects mid-stream has its request aborted and its KV blocks freed."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.server.server_process import MAX_MODEL_LEN, ServerProcess

MODEL = "smollm2-135m"


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(autouse=True)
def _healthy_after(server: ServerProcess) -> Any:
    yield
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_malformed_json(server: ServerProcess, path: str) -> None:
    r = httpx.post(server.url + path, content=b'{"prompt": "x", ', headers={"Content-Type": "application/json"})
    assert _error(r, 400)["code"] == "invalid_json"
    assert _error(httpx.post(server.url + path, content=b"[1, 2]"), 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": [10**7]}, "prompt"),
    ({"prompt": "x", "n": 300}, "n"),  # more sequences than --max-waiting (256) could ever queue
    # each of these once stopped the engine for good (every later request and /health: 503)
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
    ({"prompt": "x", "n": 2, "seed": 2**63 - 1}, "seed"),  # choice 1 would draw with seed + 1
    ({"prompt": "x", "min_tokens": 2, "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "x", "min_tokens": 10, "max_tokens": 2}, "min_tokens"),
])
def test_completions_bad_values(server: ServerProcess, body: dict[str, Any], param: str) -> None:
    err = _error(httpx.post(f"{server.url}/v1/completions", json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
])
def test_chat_bad_values(server: ServerProcess, body: dict[str, Any], param: str) -> None:
    assert _error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 400)["param"] == param


def test_unknown_model_is_404(server: ServerProcess, client: openai.OpenAI) -> None:
    err = _error(httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_prompt_too_long_names_the_limit(server: ServerProcess, client: openai.OpenAI) -> None:
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    err = _error(httpx.post(f"{server.url}/v1/completions", json={"prompt": long_prompt}), 400)
    assert str(MAX_MODEL_LEN) in err["message"] and err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    err = _error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": MAX_MODEL_LEN}), 400)
    assert err["param"] == "max_tokens" and str(MAX_MODEL_LEN) in err["message"]


def test_unknown_route_and_method(server: ServerProcess) -> None:
    _error(httpx.get(f"{server.url}/v1/nothing"), 404)
    _error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_detokenize_out_of_range(server: ServerProcess) -> None:
    assert _error(httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"


def _free_blocks(server: ServerProcess) -> tuple[float, float]:
    m = server.metrics()
    return m["tierserve:num_free_kv_blocks{}"], m["tierserve:num_kv_blocks{}"]


def _wait_all_blocks_free(server: ServerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free, total = _free_blocks(server)
        if free == total and server.metrics()["tierserve:kv_cache_usage_perc{}"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"KV blocks not freed: {_free_blocks(server)}")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_kv_blocks(server: ServerProcess, stream: bool) -> None:
    _wait_all_blocks_free(server)
    aborted_before = server.metrics().get('tierserve:request_success_total{finished_reason=abort}', 0.0)
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": stream}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert sum(1 for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")) >= 3
                free, total = _free_blocks(server)
                assert free < total  # the request holds blocks while it runs
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body, timeout=1.5)
    _wait_all_blocks_free(server)
    m = server.metrics()
    assert m["tierserve:request_success_total{finished_reason=abort}"] == aborted_before + 1
    assert m["tierserve:num_requests_running{}"] == 0


def test_null_means_default(server: ServerProcess) -> None:
    """An explicit null is the field's default, as OpenAI and vLLM take it (SDKs that send every field do this)."""
    nulls = {"n": None, "stream": None, "ignore_eos": None, "min_tokens": None, "temperature": None, "seed": None,
             "stop": None, "skip_special_tokens": None, "include_stop_str_in_output": None}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": None, **nulls}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "echo": None,
                                                           "logprobs": None, **nulls}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"prompt": "a \\ud83d b", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x \\ud83d"}], "max_tokens": 2}'),
])
def test_lone_surrogate_is_a_400(server: ServerProcess, path: str, body: bytes) -> None:
    """Valid JSON, but a lone UTF-16 surrogate escape is not text: a 400 naming the prompt (it was a 500)."""
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    assert _error(r, 400)["param"] == ("messages" if "chat" in path else "prompt")


def test_tokenize_empty_messages_is_a_400_and_the_connection_lives(server: ServerProcess) -> None:
    """/tokenize built its chat body without the 400 mapping (a 500); and any 500 used to close the client's
    keep-alive connection, so its next request failed with a reset."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert _error(client.post("/tokenize", json={"messages": []}), 400)["param"] == "messages"
        r = client.post("/tokenize", json={"prompt": "hi"})
        assert r.status_code == 200 and r.json()["count"] >= 1
