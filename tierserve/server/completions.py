"""POST /v1/completions: one engine request per prompt, ``n`` choices each, streamed (SSE) or whole."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tierserve.outputs import CompletionOutput, PositionLogprobs
from tierserve.server.generation import Generation, ServerState
from tierserve.server.protocol import CompletionRequest, parse_body
from tierserve.server.streaming import cancel_on_disconnect, clamp_logprob, sse, sse_response


class _LogprobsBuilder:
    """The completions ``logprobs`` object: tokens, their logprobs, up to N+1 alternatives and text offsets.

    A token's ``text_offset`` is where it starts in the choice's text, in characters: the characters its
    predecessors' bytes complete (a token holding the middle of a multi-byte character points at that character)."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self.token_bytes = token_bytes
        self.chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, positions: list[PositionLogprobs]) -> dict[str, Any]:
        """Append positions; returns the object for just these positions (a streaming chunk's)."""
        part = _LogprobsBuilder(self.token_bytes)
        for pos in positions:
            tid, sampled = next(iter(pos.items()))  # the engine puts the sampled token first
            token = sampled.decoded_token or ""
            for b in (self, part):
                b.tokens.append(token)
                b.token_logprobs.append(clamp_logprob(sampled.logprob))
                b.top_logprobs.append({lp.decoded_token or "": clamp_logprob(lp.logprob) for lp in pos.values()})
                b.text_offset.append(self.chars)
            self.chars += len(self._utf8.decode(self.token_bytes(tid)))
        return part.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


@dataclass
class _Choice:
    prefix: str
    """Echoed prompt text, emitted before the first generated text."""
    logprobs: _LogprobsBuilder | None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> tuple[str, dict[str, Any] | None]:
        """Accumulate a delta; returns (text, logprobs) for a streaming chunk."""
        text = self.prefix + delta.text
        self.prefix = ""
        self.text += text
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason
        lp = self.logprobs.add(delta.logprobs or []) if self.logprobs is not None else None
        return text, lp


async def create_completion(request: Request) -> Response:
    arrival = time.monotonic()
    body = await parse_body(request, CompletionRequest)
    state: ServerState = request.app.state.server
    state.check_model(body.model)
    params = body.to_sampling_params()
    prompts = [state.llm.tokenize_prompt(p) for p in body.prompts()]
    gen = Generation(state, f"cmpl-{uuid.uuid4().hex}", [ids for _, ids in prompts], params, arrival, body.priority)
    prefixes = [text if text is not None else state.llm.tokenizer.decode(ids) for text, ids in prompts]
    tokenizer = state.llm.tokenizer
    special = tokenizer.special_ids if params.skip_special_tokens else frozenset()

    def token_bytes(token_id: int) -> bytes:  # (the text's bytes: a skipped special token adds none)
        return b"" if token_id in special else tokenizer.token_bytes(token_id)

    choices = [_Choice(prefixes[k // params.n] if body.echo else "",
                       _LogprobsBuilder(token_bytes) if params.logprobs is not None else None)
               for k in range(gen.num_choices)]
    head = {"id": gen.request_id, "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}

    if body.stream:
        async def events() -> AsyncIterator[str]:
            async for k, delta in gen.deltas():
                text, lp = choices[k].add(delta)
                if text or lp or delta.finish_reason is not None:
                    choice = {"index": k, "text": text, "logprobs": lp, "finish_reason": delta.finish_reason,
                              "stop_reason": delta.stop_reason}
                    yield sse({**head, "choices": [choice], **body.chunk_usage(gen.usage)})
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": gen.usage.to_dict()})
        return sse_response(events, gen.close)

    async def collect() -> dict[str, Any]:
        async for k, delta in gen.deltas():
            choices[k].add(delta)
        return {**head, "choices": [
            {"index": k, "text": c.text, "logprobs": c.logprobs.to_dict() if c.logprobs is not None else None,
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for k, c in enumerate(choices)],
            "usage": gen.usage.to_dict()}

    try:
        result = await cancel_on_disconnect(request, collect())
    finally:
        gen.close()
    return JSONResponse(result) if result is not None else Response(status_code=499)
