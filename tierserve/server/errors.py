"""HTTP errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through ``APIError``; ``install_handlers`` maps Starlette's own errors
(unknown route, wrong method) and tierserve's typed errors onto it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve.engine.async_engine import EngineDeadError, QueueFullError
from tierserve.errors import InvalidRequestError, PromptTooLongError

logger = logging.getLogger("tierserve.server.requests")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error response: HTTP status, OpenAI error type, the offending parameter and a machine-readable code."""

    def __init__(self, status: int, message: str, type_: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_exception(cls, e: Exception) -> APIError:
        """Map a typed tierserve error (or any other, as a 500) to its HTTP form."""
        if isinstance(e, APIError):
            return e
        if isinstance(e, QueueFullError):
            return cls(503, str(e), SERVER_ERROR, code="queue_full", headers={"Retry-After": "1"})
        if isinstance(e, EngineDeadError):
            return cls(503, str(e), SERVER_ERROR, code="engine_unavailable")
        if isinstance(e, PromptTooLongError):
            return cls(400, str(e), param=e.param, code="context_length_exceeded")
        if isinstance(e, InvalidRequestError):
            return cls(400, str(e), param=e.param)
        return cls(500, f"internal error: {e!r}", SERVER_ERROR)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def validation_error(exc: ValidationError) -> APIError:
    """Turn pydantic's error list into one readable message naming the first bad field."""
    errors = exc.errors()
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']} (got {err['input']!r:.80})")
    param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
    return APIError(400, "invalid request: " + "; ".join(parts), param=param)


def log_rejection(path: str, err: APIError) -> None:
    logger.info("rejected path=%s status=%d type=%s code=%s param=%s message=%r", path, err.status, err.type,
                err.code, err.param, err.message)


def install_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Answer every error in the OpenAI shape; ``on_error(status)`` is called for each (metrics)."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = APIError.from_exception(exc)
        if err.status == 500:
            logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        log_rejection(request.url.path, err)
        on_error(err.status)
        return err.response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return await on_api_error(request, APIError(exc.status_code, str(exc.detail), type_))

    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidRequestError, on_api_error)
    app.add_exception_handler(QueueFullError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_api_error)
    app.add_exception_handler(Exception, on_api_error)
    app.add_middleware(InternalErrorMiddleware, handler=on_api_error)


class InternalErrorMiddleware:
    """Answers an unexpected exception (a bug) with the OpenAI-shaped 500 itself. Starlette's outermost handler sends
    the same 500 but then re-raises, and the server closes the client's keep-alive connection: the client's next
    request on it failed with a reset. A plain ASGI middleware, so streaming and disconnects pass through; once a
    response has started (a stream), the exception goes on up as before."""

    def __init__(self, app: Any, handler: Callable[[Request, Exception], Awaitable[JSONResponse]]) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            response = await self.handler(Request(scope, receive), exc)
            await response(scope, receive, send)
