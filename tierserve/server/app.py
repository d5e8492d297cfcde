"""The FastAPI application: OpenAI-compatible routes over one AsyncEngine.

``build_app(state, api_key)`` wires the routes; the engine thread starts and stops with the app's lifespan.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from tierserve.errors import InvalidRequestError
from tierserve.server.chat import create_chat_completion, render_prompt
from tierserve.server.completions import create_completion
from tierserve.server.errors import APIError, install_handlers, log_rejection, validation_error
from tierserve.server.generation import ServerState
from tierserve.server.metrics import CONTENT_TYPE
from tierserve.server.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body

OPEN_PATHS = frozenset({"/health", "/metrics"})


class APIKeyMiddleware:
    """Every path but /health and /metrics needs ``Authorization: Bearer <key>``; 401 otherwise.

    A plain ASGI middleware (not BaseHTTPMiddleware) so that streaming and disconnect detection pass through.
    """

    def __init__(self, app: ASGIApp, api_key: str, state: ServerState) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        log_rejection(scope["path"], err)
        self.state.metrics.request_rejected(401)
        await err.response()(scope, receive, send)


def build_app(state: ServerState, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        await state.engine.shutdown()

    app = FastAPI(title="tierserve", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.server = state
    install_handlers(app, state.metrics.request_rejected)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, state=state)

    app.post("/v1/completions")(create_completion)
    app.post("/v1/chat/completions")(create_chat_completion)

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_alive:
            raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "tierserve",
                 "root": str(state.llm.model_path), "max_model_len": state.llm.max_model_len}
                for name in state.served_model_names]
        return {"object": "list", "data": data}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("send exactly one of 'prompt' (text) or 'messages' (chat)", param="prompt")
        if body.messages is not None:
            try:
                chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt,
                                             continue_final_message=body.continue_final_message,
                                             chat_template_kwargs=body.chat_template_kwargs)
            except ValidationError as e:  # (e.g. an empty list: the same 400 as /v1/chat/completions gives)
                raise validation_error(e) from None
            tokens = render_prompt(state, chat)
        else:
            assert body.prompt is not None
            tokens = state.llm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": state.llm.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest)
        state.check_model(body.model)
        vocab = state.llm.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range for vocabulary size {vocab}", param="tokens")
        return {"prompt": state.llm.tokenizer.decode(body.tokens)}

    return app
