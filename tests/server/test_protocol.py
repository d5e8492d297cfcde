"""Request bodies (no server needed): JSON null, the priority field."""

from __future__ import annotations

from tierserve.server.protocol import ChatCompletionRequest, CompletionRequest


def test_null_is_the_default_where_none_means_nothing() -> None:
    body = CompletionRequest.model_validate({"prompt": "x", "n": None, "stream": None, "echo": None,
                                             "ignore_eos": None, "min_tokens": None})
    assert (body.n, body.stream, body.echo, body.ignore_eos, body.min_tokens) == (1, False, False, False, 0)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "logprobs": None})
    assert chat.logprobs is False


def test_null_max_tokens_means_no_limit() -> None:
    """docs/server.md: completions' max_tokens defaults to 16, and null is "the rest of the context"."""
    assert CompletionRequest.model_validate({"prompt": "x"}).to_sampling_params().max_tokens == 16
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": None}).to_sampling_params().max_tokens is None


def test_priority_is_read() -> None:
    assert CompletionRequest.model_validate({"prompt": "x", "priority": -5}).priority == -5
    assert CompletionRequest.model_validate({"prompt": "x"}).priority == 0
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "priority": 3})
    assert chat.priority == 3


def test_a_bug_is_an_openai_500_and_is_not_re_raised() -> None:
    """An unexpected exception becomes the OpenAI-shaped 500 without going on up to the ASGI server (which then
    closed the client's keep-alive connection). The test client re-raises whatever reaches it, so it would fail."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tierserve.server.errors import install_handlers

    seen: list[int] = []
    app = FastAPI()
    install_handlers(app, seen.append)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app) as client:
        r = client.get("/boom")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "a bug" in r.json()["error"]["message"] and seen == [500]
        assert client.get("/nope").status_code == 404  # Starlette's own errors still map as before
