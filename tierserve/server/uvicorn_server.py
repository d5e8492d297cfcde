"""uvicorn's server with a bounded drain on SIGINT / SIGTERM and a clean exit status."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn


class GracefulServer(uvicorn.Server):
    """On SIGINT / SIGTERM uvicorn closes its listening sockets and waits for in-flight requests to finish. After
    ``drain_timeout`` seconds this server calls ``abort_in_flight``, which ends every remaining request with an
    error its client can read (an SSE error event and ``[DONE]``, or a 503), so none is cut mid-body.

    uvicorn then re-raises the signal, which would turn a clean drain into exit status 130 / 143; this server
    returns normally instead.
    """

    def __init__(self, config: uvicorn.Config, drain_timeout: float, abort_in_flight: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.abort_in_flight = abort_in_flight

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self.abort_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
