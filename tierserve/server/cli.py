"""`tierserve serve`: load the model, then serve the OpenAI-compatible API with uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

API_KEY_ENV = "TIERSERVE_API_KEY"
_CANCEL_AFTER_ABORT_S = 5.0
"""Once in-flight requests are aborted at --shutdown-timeout, how long uvicorn waits before cancelling them."""


@dataclass
class ServerConfig:
    host: str
    port: int
    max_waiting: int
    api_key: str | None
    served_model_names: list[str]
    shutdown_timeout: float
    log_requests: bool

    def describe(self) -> dict[str, Any]:
        """The config for the start-up log line, the API key masked."""
        return {**asdict(self), "api_key": "***" if self.api_key else None}


def _server_config(args: argparse.Namespace) -> ServerConfig:
    if args.max_waiting < 1:
        raise SystemExit(f"error: --max-waiting must be >= 1, got {args.max_waiting}")
    if args.shutdown_timeout < 0:
        raise SystemExit(f"error: --shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    return ServerConfig(
        host=args.host, port=args.port, max_waiting=args.max_waiting,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_names=args.served_model_name or [args.model], shutdown_timeout=args.shutdown_timeout,
        log_requests=not args.disable_log_requests)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tierserve.cli import engine_kwargs
    from tierserve.engine.async_engine import AsyncEngine, build_off_main_thread
    from tierserve.engine.llm import LLM
    from tierserve.errors import TierserveError
    from tierserve.server.app import build_app
    from tierserve.server.generation import ServerState
    from tierserve.server.metrics import ServerMetrics
    from tierserve.server.uvicorn_server import GracefulServer

    config = _server_config(args)
    if logging.getLogger("tierserve.server").getEffectiveLevel() > logging.INFO:
        logging.getLogger("tierserve.server").setLevel(logging.INFO)  # start-up lines and one line per request
    if not config.log_requests:
        logging.getLogger("tierserve.server.requests").setLevel(logging.WARNING)
    logger.info("server config: %s", config.describe())
    try:
        engine = build_off_main_thread(lambda: LLM(**engine_kwargs(args)).engine)
    except TierserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    async_engine = AsyncEngine(engine, config.max_waiting)
    state = ServerState(async_engine, ServerMetrics(async_engine.stats, config.served_model_names[0]),
                        config.served_model_names)
    app = build_app(state, config.api_key)
    cancel_after = math.ceil(config.shutdown_timeout + _CANCEL_AFTER_ABORT_S)
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                                    timeout_graceful_shutdown=cancel_after)
    server = GracefulServer(uvicorn_config, config.shutdown_timeout, async_engine.abort_all)
    logger.info("starting the server for %s on http://%s:%d (OpenAI API under /v1)", config.served_model_names[0],
                config.host, config.port)
    server.run()
    logger.info("server stopped")
    return 0


def register(sub: Any) -> None:
    """Register the `serve` subcommand."""
    from tierserve.cli import add_engine_args

    p = sub.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Load the model and serve an OpenAI-compatible API: POST /v1/completions, "
                    "POST /v1/chat/completions (both with stream: true), GET /v1/models, GET /health, "
                    "GET /metrics (Prometheus), POST /tokenize, POST /detokenize. SIGINT or SIGTERM stops it "
                    "gracefully: no new connections, in-flight requests get --shutdown-timeout seconds to finish, "
                    "then are aborted; the exit status is 0.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="model name clients must send in 'model' (repeatable; the first is reported in "
                        "responses); default: the --model value")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every route but /health and /metrics "
                        f"(default: the {API_KEY_ENV} environment variable; unset = no key)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="most sequences accepted but not yet running; beyond it requests get 503 with "
                        "Retry-After; a request with n choices counts n (default: %(default)s)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run after SIGINT / SIGTERM before they are aborted "
                        "(default: %(default)s)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="do not log one INFO line per request (id, tokens, latency)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
