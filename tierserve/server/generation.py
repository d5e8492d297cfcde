"""Generation: the engine requests of one API call, from submission to the last delta.

A completions call with several prompts, or any call with ``n > 1``, has several *choices*; choice ``k`` is
completion ``k % n`` of prompt ``k // n`` (vLLM's numbering). ``Generation`` submits one engine request per prompt,
yields ``(choice index, delta)`` pairs, records metrics as engine requests finish, writes one log line per call and,
if the caller stops early (client gone, shutdown), aborts what is left so its KV blocks are freed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tierserve.engine.async_engine import AsyncEngine, EngineRequest, RequestStream
from tierserve.engine.llm_engine import LLMEngine
from tierserve.outputs import CompletionOutput
from tierserve.sampling_params import SamplingParams
from tierserve.server.errors import model_not_found
from tierserve.server.metrics import ServerMetrics

logger = logging.getLogger("tierserve.server.requests")


@dataclass
class ServerState:
    """What every handler needs, kept on ``app.state.server``."""

    engine: AsyncEngine
    metrics: ServerMetrics
    served_model_names: list[str]
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> None:
        """A request may name the model (any served name) or leave it out; anything else is a 404."""
        if name is not None and name not in self.served_model_names:
            raise model_not_found(name)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Generation:
    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams,
                 arrival_time: float, priority: int = 0) -> None:
        """Validate every prompt, then submit them all (or raise: InvalidRequestError, QueueFullError, ...)."""
        for token_ids in prompts:
            state.llm.validate_prompt(token_ids, params)
        self.state = state
        self.request_id = request_id
        self.n = params.n
        self.arrival_time = arrival_time
        self.usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
        self._prompt_index = {f"{request_id}-{i}": i for i in range(len(prompts))}
        self._finish_reasons: dict[str, list[str]] = {rid: [] for rid in self._prompt_index}
        self._first_token_time: float | None = None
        self._closed = False
        self._stream: RequestStream = state.engine.submit([
            EngineRequest(rid, prompts[i], params, arrival_time, priority) for rid, i in self._prompt_index.items()])

    @property
    def num_choices(self) -> int:
        return len(self._prompt_index) * self.n

    async def deltas(self) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """Yield (choice index, delta) until every choice finished; aborts the rest if the caller stops early."""
        output_lengths: dict[str, dict[int, int]] = {rid: {} for rid in self._prompt_index}
        try:
            async for out in self._stream:
                if self._first_token_time is None:
                    self._first_token_time = time.monotonic()
                base = self._prompt_index[out.request_id] * self.n
                lengths = output_lengths[out.request_id]
                for c in out.outputs:
                    self.usage.completion_tokens += len(c.token_ids)
                    lengths[c.index] = lengths.get(c.index, 0) + len(c.token_ids)
                    if c.finish_reason is not None:
                        self._finish_reasons[out.request_id].append(c.finish_reason)
                    yield base + c.index, c
                if out.finished:
                    self.state.metrics.request_finished(self._finish_reasons[out.request_id], out.metrics,
                                                        max(lengths.values(), default=0))
        finally:
            self.close()

    def close(self) -> None:
        """Abort what has not finished, record it and write the request's log line (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        aborted = self._stream.close()
        if aborted:
            self.state.metrics.request_aborted(sum(self.n - len(self._finish_reasons[rid]) for rid in aborted))
        reasons = sorted({r for rs in self._finish_reasons.values() for r in rs})
        now = time.monotonic()
        ttft = (self._first_token_time - self.arrival_time) if self._first_token_time is not None else None
        logger.info("request id=%s prompts=%d n=%d prompt_tokens=%d completion_tokens=%d finish=%s ttft=%s "
                    "latency=%.3fs%s", self.request_id, len(self._prompt_index), self.n, self.usage.prompt_tokens,
                    self.usage.completion_tokens, ",".join(reasons) or "-",
                    f"{ttft:.3f}s" if ttft is not None else "-", now - self.arrival_time,
                    f" aborted={len(aborted)}" if aborted else "")
