"""POST /v1/chat/completions: the model's chat template, then one engine request with ``n`` choices."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tierserve.errors import InvalidRequestError
from tierserve.outputs import Logprob, PositionLogprobs
from tierserve.server.generation import Generation, ServerState
from tierserve.server.protocol import ChatCompletionRequest, parse_body
from tierserve.server.streaming import cancel_on_disconnect, clamp_logprob, sse, sse_response


def _token_entry(token_id: int, lp: Logprob, token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
    """One token's entry; ``bytes`` are the token's own (part of a character where it holds one, as OpenAI's)."""
    return {"token": lp.decoded_token or "", "logprob": clamp_logprob(lp.logprob), "bytes": list(token_bytes(token_id))}


def chat_logprobs(positions: list[PositionLogprobs], num_top: int,
                  token_bytes: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content``: per token, the sampled token and the ``num_top`` most likely ones."""
    content = []
    for pos in positions:
        tid, sampled = next(iter(pos.items()))  # the engine puts the sampled token first
        top = sorted(pos.items(), key=lambda item: item[1].rank)[:num_top]
        content.append({**_token_entry(tid, sampled, token_bytes),
                        "top_logprobs": [_token_entry(t, lp, token_bytes) for t, lp in top]})
    return content


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def to_dict(self, index: int, with_logprobs: bool) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": self.text},
                "logprobs": {"content": self.logprobs} if with_logprobs else None,
                "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}


def render_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    text = state.llm.tokenizer.apply_chat_template(body.template_messages(), body.add_generation_prompt,
                                                   body.continue_final_message, body.chat_template_kwargs)
    try:
        return state.llm.tokenizer.encode(text, add_special_tokens=False)
    except InvalidRequestError as e:  # (invalid text in a message: the offset is into the templated prompt)
        raise InvalidRequestError(f"a message: {e} (in the prompt the chat template made)", param="messages") from None


async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    body = await parse_body(request, ChatCompletionRequest)
    state: ServerState = request.app.state.server
    state.check_model(body.model)
    params = body.to_sampling_params()
    gen = Generation(state, f"chatcmpl-{uuid.uuid4().hex}", [render_prompt(state, body)], params, arrival,
                     body.priority)
    num_top = body.top_logprobs or 0
    token_bytes = state.llm.tokenizer.token_bytes
    head = {"id": gen.request_id, "created": int(time.time()), "model": state.model_name}

    if body.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}

        def chunk(choice: dict[str, Any]) -> str:
            return sse({**chunk_head, "choices": [choice], **body.chunk_usage(gen.usage)})

        async def events() -> AsyncIterator[str]:
            for k in range(gen.num_choices):
                yield chunk({"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            async for k, delta in gen.deltas():
                lp = chat_logprobs(delta.logprobs or [], num_top, token_bytes) if body.logprobs else None
                if delta.text or lp or delta.finish_reason is not None:
                    yield chunk({"index": k, "delta": {"content": delta.text} if delta.text else {},
                                 "logprobs": {"content": lp} if lp is not None else None,
                                 "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason})
            if body.include_usage:
                yield sse({**chunk_head, "choices": [], "usage": gen.usage.to_dict()})
        return sse_response(events, gen.close)

    async def collect() -> dict[str, Any]:
        choices = [_Choice() for _ in range(gen.num_choices)]
        async for k, delta in gen.deltas():
            c: _Choice = choices[k]
            c.text += delta.text
            if body.logprobs:
                c.logprobs.extend(chat_logprobs(delta.logprobs or [], num_top, token_bytes))
            c.finish_reason, c.stop_reason = delta.finish_reason, delta.stop_reason
        return {**head, "object": "chat.completion",
                "choices": [c.to_dict(k, body.logprobs) for k, c in enumerate(choices)],
                "usage": gen.usage.to_dict()}

    try:
        result = await cancel_on_disconnect(request, collect())
    finally:
        gen.close()
    return JSONResponse(result) if result is not None else Response(status_code=499)
