"""Attention backends, chosen by name (``--attention-backend``). A backend owns the KV cache layout."""

from __future__ import annotations

from tierserve.model_executor.attention.base import AttentionBackend, AttentionMetadata
from tierserve.model_executor.attention.cpu_backend import CpuAttentionBackend, ReferenceAttentionBackend
from tierserve.model_executor.attention.cpu_backend import available as cpu_kernels_available
from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend
from tierserve.model_executor.attention.triton_backend import TritonAttentionBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend, "cpu": CpuAttentionBackend,
                                                "reference": ReferenceAttentionBackend,
                                                "triton": TritonAttentionBackend}


def resolve_backend_name(name: str, device: str) -> str:
    """``auto``: the native CPU kernels on a CPU where they build, else plain torch ops (``triton``, CUDA's paged
    decode kernel, only when asked for: it has not yet run on a GPU of this project)."""
    if name != "auto":
        return name
    if str(device).startswith("cpu") and cpu_kernels_available():
        return "cpu"
    return "torch"


def get_backend(name: str) -> type[AttentionBackend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}") from None


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "get_backend", "resolve_backend_name"]
