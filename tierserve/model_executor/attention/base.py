"""The attention backend interface and the per-step metadata every backend reads.

Layout of a step's tokens (flattened, no padding): first the decode tokens (one per decoding request), then the
prefill chunks, request after request. ``slot_mapping[t]`` is where token t's K/V goes in the cache
(``block_id * block_size + offset``). K is cached after RoPE, at its true position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[num_tokens] int64 flat cache slot of every token in the step."""
    num_decode_tokens: int
    decode_block_tables: torch.Tensor
    """[num_decodes, max_blocks] int64 (padded with 0)."""
    decode_seq_lens: torch.Tensor
    """[num_decodes] int64: context length including the new token."""
    prefill_query_lens: list[int]
    prefill_seq_lens: list[int]
    prefill_block_tables: torch.Tensor
    """[num_prefills, max_blocks] int64."""
    prefill_query_start: torch.Tensor
    """[num_prefills + 1] int64 offsets of each prefill chunk within the prefill tokens."""
    prefill_seq_lens_t: torch.Tensor | None = None
    """``prefill_seq_lens`` as an int64 tensor (on the host), when the runner built one."""
    prefill_ref_lens_t: torch.Tensor | None = None
    """Per prefill chunk, the length of the whole prompt it belongs to (>= its seq len; int64, host): the shape of
    the single attention call transformers would make, which the CPU kernels follow for its summation orders."""


class AttentionBackend(Protocol):
    """One object per model; ``forward`` is called per layer with that layer's cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None: ...

    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """One tensor per layer, in the layout this backend reads."""
        ...

    @staticmethod
    def bytes_per_block(num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block in one layer (K and V)."""
        ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (after RoPE) -> [T, H * D]. Writes k/v into ``kv_cache`` first."""
        ...
