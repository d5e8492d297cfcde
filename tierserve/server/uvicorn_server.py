"""uvicorn's server with a clean exit status after a graceful shutdown."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import uvicorn


class GracefulServer(uvicorn.Server):
    """On SIGINT / SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (up to
    ``timeout_graceful_shutdown`` seconds, then cancels them) and runs the app's shutdown. It then re-raises the
    signal, which would make a clean drain exit with status 130 / 143; this server returns normally instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
