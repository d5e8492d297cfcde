"""`tierserve bench` (being built: issues 6 and 7)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Register the `bench` subcommands."""
