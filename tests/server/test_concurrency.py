"""Bar 3: 32 concurrent streaming clients (asyncio + httpx) all finish with their own, unmixed outputs.

Each stream is compared with a greedy reference from ``LLM.generate`` for its own prompt. The server batches the
32 requests differently than the reference does, and float32 batched matmuls may round differently, so a stream
may leave its reference only at a near-tie (vLLM's rule, as in tests/reference.py): where the tokens first differ,
each must be among the other side's 5 most likely tokens. A stream that received another request's tokens fails.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.server.server_process import ServerProcess
from tests.server.worker import on_worker
from tierserve.engine.llm import LLM
from tierserve.sampling_params import SamplingParams

NUM_CLIENTS = 32
MAX_TOKENS = 8
SUBJECTS = ["cats", "the ocean", "Paris", "volcanoes", "bread", "chess", "the moon", "rain", "jazz", "bicycles",
            "coffee", "winter", "robots", "gardens", "trains", "honey"]
PROMPTS = [f"{i + 1}. A short fact about {SUBJECTS[i % 16]}{' and music' if i >= 16 else ''}:"
           for i in range(NUM_CLIENTS)]


async def _stream(client: httpx.AsyncClient, prompt: str) -> tuple[list[str], list[set[str]], str]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5, "stream": True}
    tokens: list[str] = []
    top5: list[set[str]] = []
    finish = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            assert choice["index"] == 0
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                top5 += [set(t) for t in choice["logprobs"]["top_logprobs"]]
            finish = choice["finish_reason"] or finish
    return tokens, top5, finish


async def _run_all(url: str) -> list[tuple[list[str], list[set[str]], str]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(_stream(client, p) for p in PROMPTS))


def test_32_concurrent_streams_are_unmixed(server: ServerProcess, llm: LLM) -> None:
    refs = on_worker(llm.generate, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5),
                     use_tqdm=False)
    results = asyncio.run(_run_all(server.url))
    identical = 0
    for prompt, ref, (tokens, top5, finish) in zip(PROMPTS, refs, results, strict=True):
        out = ref.outputs[0]
        assert out.logprobs is not None
        ref_tokens = [next(iter(pos.values())).decoded_token or "" for pos in out.logprobs]
        ref_top5 = [{lp.decoded_token or "" for lp in pos.values() if lp.rank <= 5} for pos in out.logprobs]
        assert finish == out.finish_reason, prompt
        if tokens == ref_tokens:
            identical += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b)
        assert tokens[i] in ref_top5[i] and ref_tokens[i] in top5[i], f"{prompt!r}: {tokens} vs {ref_tokens}"
    assert identical >= NUM_CLIENTS - 4, f"only {identical}/{NUM_CLIENTS} streams identical to their reference"
