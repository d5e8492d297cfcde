"""A small real HTTP server for the bench tests: streams OpenAI-style SSE with known delays, or misbehaves.

Not a mock of tierserve: it is a *server under test* whose timings and faults are known, so the client's
measurements and failure accounting can be checked. The behaviour is chosen by the first path segment of the
base URL (``http://127.0.0.1:<port>/<mode>``):

- ``ok``: first token after ``ttft_s``, then one token every ``gap_s``; a usage chunk at the end.
- ``nousage``: like ``ok`` without the usage chunk.
- ``error500``: HTTP 500 for every request; ``flaky``: every third request gets HTTP 500.
- ``drop``: two tokens, then the connection is closed mid-stream.
- ``slow``: waits ``slow_s`` before the first token (to trip ``--request-timeout``).
- ``errorevent``: one token, then an ``{"error": ...}`` event. ``garbage``: a chunk that is not JSON.

``/<mode>/metrics`` exposes prefix-cache counters (10 hits per 20 queries per request) and ``/<mode>/v1/models``
lists one model. Every request body is kept in ``requests`` for assertions.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeServer:
    def __init__(self, ttft_s: float = 0.05, gap_s: float = 0.01, slow_s: float = 30.0) -> None:
        self.ttft_s, self.gap_s, self.slow_s = ttft_s, gap_s, slow_s
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        """The Authorization header of each generation request."""
        self.hits = self.queries = 0
        self.inflight = self.max_inflight = 0
        self.port = free_port()
        app = Starlette(routes=[
            Route("/{mode}/v1/completions", self.generate, methods=["POST"]),
            Route("/{mode}/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/{mode}/v1/models", self.models),
            Route("/{mode}/metrics", self.metrics),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(
            "# TYPE fake:prefix_cache_hits counter\n"
            f'fake:prefix_cache_hits_total{{model="m"}} {self.hits}\n'
            f'fake:prefix_cache_hits_created{{model="m"}} 1.7e9\n'
            f'fake:prefix_cache_queries_total{{model="m"}} {self.queries}\n'
            "fake:other_total 5\n")

    async def generate(self, request: Request) -> Response:
        mode = request.path_params["mode"]
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("authorization"))
        n = len(self.requests)
        if mode == "error500" or (mode == "flaky" and n % 3 == 0):
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        self.hits += 10
        self.queries += 20
        return StreamingResponse(self.stream(mode, body, n), media_type="text/event-stream")

    async def stream(self, mode: str, body: dict[str, Any], n: int) -> AsyncIterator[str]:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            async for part in self._stream(mode, body, n):
                yield part
        finally:
            self.inflight -= 1

    async def _stream(self, mode: str, body: dict[str, Any], n: int) -> AsyncIterator[str]:
        chat = "messages" in body
        num = int(body.get("max_tokens", 16))

        def chunk(text: str) -> str:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return "data: " + json.dumps({"choices": [choice]}) + "\n\n"

        if chat:
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
        await asyncio.sleep(self.slow_s if mode == "slow" else self.ttft_s)
        for i in range(num):
            if i > 0:
                await asyncio.sleep(self.gap_s)
            if mode == "drop" and i == 2:
                raise ConnectionResetError("fake server drops the connection")
            if mode == "errorevent" and i == 1:
                yield "data: " + json.dumps({"error": {"message": "engine died"}}) + "\n\n"
                return
            if mode == "garbage" and i == 1:
                yield "data: {not json\n\n"
                return
            yield chunk(f" r{n}t{i}")
        final = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else \
            {"index": 0, "text": "", "finish_reason": "length"}
        yield "data: " + json.dumps({"choices": [final]}) + "\n\n"
        if mode != "nousage":
            prompt = body.get("prompt") or " ".join(m["content"] for m in body["messages"])
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": num,
                     "total_tokens": len(prompt.split()) + num}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
