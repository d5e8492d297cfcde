"""Paged attention through the native CPU kernels (``tierserve/kernels/csrc/paged_attention.cpp``).

Same cache layout as the torch backend (``[2, Hkv, num_blocks, block_size, D]``), so the two are interchangeable
and the torch one stays the reference. Decode and prefill chunks read K/V in place through the block tables: no
gather copy, no padding, no mask tensor, float32 accumulation. Decodes and prefill chunks run as two kernel calls
per layer, whatever the mix.
"""

from __future__ import annotations

import torch

from tierserve.kernels import cpu_ops
from tierserve.model_executor.attention.base import AttentionMetadata
from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend

PREFILL_TILE = 32
"""Query tokens per prefill work item (load balance across threads; K/V of a tile's context stay in cache)."""


def available() -> bool:
    return cpu_ops() is not None


class CpuAttentionBackend(TorchAttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        ops = cpu_ops()
        if ops is None:
            raise RuntimeError("the 'cpu' attention backend needs the native kernels, which could not be built here "
                               "(see the warning above); use --attention-backend torch")
        self.ops = ops

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if not kv_cache.is_cpu:
            return super().forward(q, k, v, kv_cache, meta)
        flat_k = kv_cache[0].view(self.num_kv_heads, -1, self.head_dim)
        flat_v = kv_cache[1].view(self.num_kv_heads, -1, self.head_dim)
        flat_k.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        flat_v.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        return self.attend(q, kv_cache, meta)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention for q [T, H, D] whose K/V are already in the cache (the fused RoPE + cache-write op put them
        there) -> [T, H * D]."""
        num_tokens = q.shape[0]
        nd = meta.num_decode_tokens
        parts = []
        if nd:
            parts.append(self.ops.paged_decode(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                               self.scale))
        if nd < num_tokens:
            seq_lens = meta.prefill_seq_lens_t
            if seq_lens is None:
                seq_lens = torch.tensor(meta.prefill_seq_lens, dtype=torch.long)
            parts.append(self.ops.paged_prefill(q[nd:], kv_cache, meta.prefill_block_tables,
                                                meta.prefill_query_start, seq_lens, self.scale, PREFILL_TILE))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return o.view(num_tokens, self.num_heads * self.head_dim)
