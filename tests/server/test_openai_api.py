"""Bars 1 and 6: the official openai client against the real server (completions, chat, streaming, n, logprobs,
stop strings, seeds), plus /v1/models, /tokenize and /detokenize."""

from __future__ import annotations

import time

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.server.server_process import MAX_MODEL_LEN, ServerProcess

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CHAT: list[ChatCompletionMessageParam] = [{"role": "system", "content": "You are terse."},
                                          {"role": "user", "content": "Name three colors."}]


def _stream_completion_texts(client: openai.OpenAI, **kwargs: object) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):  # type: ignore[call-overload]
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    return texts


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "tierserve"


def test_completion_basic(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text.startswith(" Paris")
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 5


def test_completion_stream_equals_non_stream_with_seed(client: openai.OpenAI) -> None:
    kwargs = dict(prompt=PROMPT, max_tokens=10, temperature=0.9, seed=1234, n=2)
    whole = client.completions.create(model=MODEL, **kwargs)  # type: ignore[call-overload]
    again = client.completions.create(model=MODEL, **kwargs)  # type: ignore[call-overload]
    streamed = _stream_completion_texts(client, **kwargs)
    assert [c.text for c in whole.choices] == [c.text for c in again.choices]  # seed reproducibility
    assert streamed == {c.index: c.text for c in whole.choices}
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_idle_server_uses_no_cpu(server: ServerProcess) -> None:
    """The engine thread sleeps when there is no work: no busy polling."""
    time.sleep(1.0)  # let torch's worker threads stop spinning after the last request
    before = server.cpu_seconds()
    time.sleep(2.0)
    assert server.cpu_seconds() - before < 0.1


def test_chat_stream_equals_non_stream_with_seed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0.8, seed=7)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0.8, seed=7,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, n=3, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage is not None
    assert r.usage.completion_tokens <= 15


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and len(top) <= 4 and logprob <= 0
        assert logprob == max(top.values())  # greedy: the sampled token is the most likely one
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.token == item.top_logprobs[0].token and item.logprob == item.top_logprobs[0].logprob
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert bytes(item.bytes or []) == item.token.encode()
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    tokens = [t.token for ch in streamed if ch.choices and ch.choices[0].logprobs
              for t in ch.choices[0].logprobs.content or []]
    assert tokens == [t.token for t in content]


def test_stop_strings(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[8:11]
    cut = full[: full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert _stream_completion_texts(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop) == {0: cut}
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    text = chat.choices[0].message.content or ""
    assert len(text) > 6
    stopped = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                             stop=text[3:6])
    assert stopped.choices[0].message.content == text[: text.index(text[3:6])]
    assert stopped.choices[0].finish_reason == "stop"


def test_prompt_forms(server: ServerProcess, client: openai.OpenAI) -> None:
    """A string, a list of strings, token ids and a list of token-id lists give the same greedy text."""
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    for prompt in ([PROMPT, PROMPT], ids, [ids, ids]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        expected = 2 if isinstance(prompt[0], (str, list)) else 1
        assert [c.index for c in r.choices] == list(range(expected))
        assert all(c.text == single for c in r.choices)
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=3, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # choice k = completion k % n of prompt k // n


def test_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + plain
    assert _stream_completion_texts(client, prompt=PROMPT, max_tokens=4, temperature=0, echo=True) == {
        0: PROMPT + plain}


def test_max_completion_tokens_and_unknown_fields(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0,
                                       extra_body={"no_such_field": 1, "ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_tokenize_detokenize(server: ServerProcess, client: openai.OpenAI) -> None:
    t = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert t["count"] == len(t["tokens"]) == 5 and t["max_model_len"] == MAX_MODEL_LEN
    d = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": t["tokens"]}).json()
    assert d == {"prompt": PROMPT}
    chat_tokens = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()["count"]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert r.usage is not None and r.usage.prompt_tokens == chat_tokens


def test_continue_final_message(server: ServerProcess, client: openai.OpenAI) -> None:
    """vLLM's continue_final_message: the last (assistant) message stays open and the answer continues it."""
    start = "My favourite colour is"
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": start}]
    body = {"model": MODEL, "messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(f"{server.url}/tokenize", json=body).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text.endswith(start)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer.strip() and r.json()["usage"]["prompt_tokens"] == len(tokens)
    both = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    reserved = httpx.post(f"{server.url}/v1/chat/completions",
                          json={**body, "chat_template_kwargs": {"messages": []}})
    assert reserved.status_code == 400 and reserved.json()["error"]["param"] == "chat_template_kwargs"


def test_unsupported_vllm_fields_are_400s(server: ServerProcess) -> None:
    """Fields of vLLM's API that would change the answer and are not implemented get a 400 naming them (not an
    answer that ignores them); their neutral values (null, false, empty) are accepted."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    cases = [("guided_choice", ["red", "blue"]), ("guided_json", {"type": "object"}), ("allowed_token_ids", [504]),
             ("bad_words", ["Blue"]), ("use_beam_search", True), ("prompt_logprobs", 0), ("truncate_prompt_tokens", 2),
             ("structured_outputs", {"choice": ["red"]})]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, value in cases:
            for path, body in (("/v1/chat/completions", chat), ("/v1/completions", comp)):
                r = http.post(path, json={**body, name: value})
                assert r.status_code == 400 and r.json()["error"]["param"] == name, (path, name, r.text)
        for name, value in (("echo", True), ("chat_template", "{{ 'x' }}")):
            r = http.post("/v1/chat/completions", json={**chat, name: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == name
        r = http.post("/v1/completions", json={**comp, "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        neutral: dict[str, object] = {"guided_choice": None, "allowed_token_ids": [], "use_beam_search": False,
                                      "bad_words": [], "prompt_logprobs": None, "echo": False}
        assert http.post("/v1/chat/completions", json={**chat, **neutral}).status_code == 200


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    """stream_options.continuous_usage_stats (vLLM's): every chunk carries the usage so far."""
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {"include_usage": True,
                                                                               "continuous_usage_stats": True}}))
    usages = [ch.usage for ch in chunks]
    assert all(u is not None for u in usages)
    counts = [u.completion_tokens for u in usages if u is not None]
    assert counts == sorted(counts) and counts[-1] == 6 and len(set(counts)) > 2
    plain = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}))
    assert [ch.usage is None for ch in plain[:-1]] == [True] * (len(plain) - 1) and plain[-1].usage is not None
