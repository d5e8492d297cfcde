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
