"""`tierserve serve` (being built: issue 4)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Register the `serve` subcommand (implemented by the server module)."""
