"""`tierserve bench throughput` and `tierserve bench latency` (being built: issue 6)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Register `bench throughput` and `bench latency` under the `bench` subparsers."""
