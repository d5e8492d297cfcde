"""`tierserve bench compare` (being built: issue 7)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Register `bench compare` under the `bench` subparsers."""
