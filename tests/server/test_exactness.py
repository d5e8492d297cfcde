"""Bar 2: greedy output through the server equals ``LLM.generate`` / ``LLM.chat`` for the same prompts.

Each prompt runs alone on both sides (a batch of one), so the float32 computations are the same and the texts must
be identical, not just close.
"""

from __future__ import annotations

import openai

from tests.server.worker import on_worker
from tierserve.engine.llm import LLM
from tierserve.sampling_params import SamplingParams

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 12


def test_greedy_completions_match_llm_generate(llm: LLM, client: openai.OpenAI) -> None:
    for prompt in PROMPTS:
        ref = on_worker(llm.generate, prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == ref.outputs[0].text, prompt
        assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert r.usage is not None
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_greedy_chat_matches_llm_chat(llm: LLM, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = on_worker(llm.chat, messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                       temperature=0)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage is not None and r.usage.prompt_tokens == len(ref.prompt_token_ids)
