"""Attention backends, chosen by name (``--attention-backend``). A backend owns the KV cache layout."""

from __future__ import annotations

from tierserve.model_executor.attention.base import AttentionBackend, AttentionMetadata
from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}


def get_backend(name: str) -> type[AttentionBackend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}") from None


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "get_backend"]
