"""Server-sent events and client-disconnect handling shared by the completions and chat endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from tierserve.server.errors import APIError

logger = logging.getLogger(__name__)

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
LOGPROB_FLOOR = -9999.0
"""JSON has no -inf; a log-probability below this is reported as this (vLLM does the same)."""


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however it ends, even when the client disconnects before the
    first event (Starlette then never starts the body generator, so the generator's own cleanup cannot run)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse_response(events: Callable[[], AsyncIterator[str]], on_close: Callable[[], None]) -> StreamingResponse:
    """Stream ``events()`` and end with ``[DONE]``; an error after the headers went out becomes an error event.

    When the client disconnects, Starlette cancels the stream and ``on_close`` aborts the request.
    """
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events():
                yield event
        except Exception as e:
            err = APIError.from_exception(e)
            logger.warning("stream ended by an error: %s", err.message, exc_info=err.status == 500)
            yield sse(err.body())
        yield DONE

    return _SSEResponse(body(), on_close)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first: then cancel it (its cleanup aborts the request).

    Only for non-streaming responses whose body has been read; returns None when the client went away.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    logger.info("client disconnected from %s before the response was ready", request.url.path)
    return None


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)
