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


def test_logprob_bytes_and_offsets_of_split_characters() -> None:
    """Tokens holding part of a character (an emoji is three tokens with this tokenizer): chat ``bytes`` are each
    token's own bytes, so joined they give the text back (OpenAI's definition; decoding one such token alone gives
    U+FFFD), and completions' ``text_offset`` points into the text, at the character a token helps make."""
    from tierserve.bench.sources import load_tokenizer
    from tierserve.outputs import Logprob
    from tierserve.server.chat import chat_logprobs
    from tierserve.server.completions import _LogprobsBuilder

    tok = load_tokenizer("smollm2-135m")
    text = "\U0001F355\U0001F355 h\u00e9llo \u4f60\u597d!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) - 2  # characters split over tokens (else this test shows nothing)
    positions = [{t: Logprob(-0.5, 1, tok.decode([t])), 7: Logprob(-2.0, 2, tok.decode([7]))} for t in ids]
    content = chat_logprobs(positions, 1, tok.token_bytes)
    assert "\ufffd" in "".join(c["token"] for c in content)  # (what decoding one token alone shows)
    assert b"".join(bytes(c["bytes"]) for c in content).decode() == text
    assert [bytes(c["top_logprobs"][0]["bytes"]) for c in content] == [tok.token_bytes(t) for t in ids]
    builder = _LogprobsBuilder(tok.token_bytes)
    first = builder.add(positions[:4])  # (two chunks, as a stream sends them)
    rest = builder.add(positions[4:])
    offsets = builder.text_offset
    assert first["text_offset"] + rest["text_offset"] == offsets
    assert offsets[:6] == [0, 0, 0, 1, 1, 1]  # the pieces of each emoji point at it
    assert offsets == sorted(offsets) and max(offsets) < len(text)
    for t, o in zip(ids, offsets, strict=True):
        piece = tok.token_bytes(t).decode("utf-8", "ignore")
        if piece:  # a token holding whole characters starts where they are
            assert text[o:].startswith(piece), (t, o)


def test_continue_final_message_in_the_template() -> None:
    """The text ends with the last message's content (no end of turn after it); both options at once are an error,
    as are reserved template variables."""
    import pytest

    from tierserve.bench.sources import load_tokenizer
    from tierserve.errors import InvalidRequestError

    tok = load_tokenizer("smollm2-135m")
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "It is "}]
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    opened = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert opened.endswith("It is ") and closed.startswith(opened) and len(closed) > len(opened)
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)
    assert e.value.param == "continue_final_message"
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template(messages[:1] + [{"role": "assistant", "content": ""}], add_generation_prompt=False,
                                continue_final_message=True)
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template(messages, add_generation_prompt=False, template_kwargs={"eos_token": "x"})
    assert e.value.param == "chat_template_kwargs"


def test_text_offset_after_a_skipped_special_token() -> None:
    """With skip_special_tokens (the default) a special token adds nothing to the text, so the next token's offset
    stays where it was (the server's completions pass a token_bytes that gives special tokens no bytes)."""
    from tierserve.bench.sources import load_tokenizer
    from tierserve.outputs import Logprob
    from tierserve.server.completions import _LogprobsBuilder

    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode("Hi<|im_end|> there", add_special_tokens=False)
    special = [i for i in ids if i in tok.special_ids]
    assert special, ids
    builder = _LogprobsBuilder(lambda t: b"" if t in tok.special_ids else tok.token_bytes(t))
    builder.add([{t: Logprob(-0.1, 1, tok.decode([t], skip_special_tokens=False))} for t in ids])
    text = tok.decode(ids)  # (special tokens skipped)
    assert text == "Hi there"
    assert builder.text_offset == [0, 2, 2]
