"""Paged attention in plain torch ops (CPU and CUDA).

Cache layout per layer: ``[2, num_kv_heads, num_blocks, block_size, head_dim]`` (K then V; head-major, so gathering
a batch's blocks with one ``index_select`` yields ``[kv_heads, batch, context, head_dim]`` ready for batched GEMMs
without a transposing copy).

Decodes: all decoding requests at once as two batched GEMMs per layer (batch = kv_heads x requests, the query
heads of a group stacked as rows), an additive length mask and a float32 softmax.
Prefill chunks: one batched SDPA call over padded queries with a causal mask offset by each chunk's context, so a
chunk of a long prompt sees the earlier chunks from the cache; a whole prompt alone in the step skips the cache
read. No Python loop over requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tierserve.model_executor.attention.base import AttentionMetadata


class TorchAttentionBackend:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = head_dim**-0.5

    @staticmethod
    def bytes_per_block(num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        shape = (2, self.num_kv_heads, num_blocks, self.block_size, self.head_dim)
        if device.type == "cpu":  # one huge-page buffer (fewer TLB misses), faulted in now rather than mid-step
            from tierserve.utils.hugepages import host_buffer

            nbytes = num_layers * 2 * self.num_kv_heads * num_blocks * self.block_size * self.head_dim * \
                torch.empty((), dtype=dtype).element_size()
            return list(host_buffer(nbytes, populate=True).view(dtype).view(num_layers, *shape).unbind(0))
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """[Hkv, nblocks, bs, D] gathered by [B, max_blocks] -> [Hkv, B, max_blocks * bs, D] (contiguous)."""
        b, nb = block_tables.shape
        x = cache.index_select(1, block_tables.reshape(-1))
        return x.view(self.num_kv_heads, b, nb * self.block_size, self.head_dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = q.shape[0]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        flat_k = k_cache.view(self.num_kv_heads, -1, self.head_dim)
        flat_v = v_cache.view(self.num_kv_heads, -1, self.head_dim)
        flat_k.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        flat_v.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        nd = meta.num_decode_tokens
        if nd == num_tokens:
            return self._decode(q, k_cache, v_cache, meta)
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta).reshape(num_tokens - nd, -1)
        return out

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        b = q.shape[0]
        keys = self._gather(k_cache, meta.decode_block_tables)  # [Hkv, B, L, D]
        values = self._gather(v_cache, meta.decode_block_tables)
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim).transpose(0, 1)  # [Hkv, B, g, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [Hkv, B, g, L]
        length = keys.shape[2]
        pad = torch.arange(length, device=q.device)[None, :] >= meta.decode_seq_lens[:, None]  # [B, L]
        scores = scores.mul_(self.scale).masked_fill_(pad[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(values.dtype)
        o = torch.matmul(probs, values)  # [Hkv, B, g, D]
        return o.transpose(0, 1).reshape(b, self.num_heads * self.head_dim)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qlens, slens = meta.prefill_query_lens, meta.prefill_seq_lens
        if len(qlens) == 1 and qlens[0] == slens[0]:
            # A whole prompt in one chunk: its K/V are the fresh ones, no gather needed.
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                is_causal=True, scale=self.scale, enable_gqa=True,
            )
            return o.squeeze(0).transpose(0, 1)
        b = len(qlens)
        max_q = max(qlens)
        device = q.device
        qlen_t = torch.tensor(qlens, device=device)
        slen_t = torch.tensor(slens, device=device)
        starts = meta.prefill_query_start[:-1]
        # Padded query index: row i of request r is token starts[r] + i (valid when i < qlen[r]).
        ar = torch.arange(max_q, device=device)
        valid = ar[None, :] < qlen_t[:, None]  # [B, max_q]
        src = (starts[:, None] + ar[None, :]).clamp(max=q.shape[0] - 1)
        qp = q.index_select(0, src.reshape(-1)).view(b, max_q, self.num_heads, self.head_dim)
        keys = self._gather(k_cache, meta.prefill_block_tables).transpose(0, 1)  # [B, Hkv, L, D]
        values = self._gather(v_cache, meta.prefill_block_tables).transpose(0, 1)
        max_len = keys.shape[2]
        kpos = torch.arange(max_len, device=device)
        qpos = (slen_t - qlen_t)[:, None] + ar[None, :]  # absolute position of each query row
        mask = kpos[None, None, :] <= qpos[:, :, None]  # causal, also hides keys beyond seq_len
        mask = mask | ~valid[:, :, None] & (kpos[None, None, :] == 0)  # padded rows: attend to one key, no NaN
        o = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=self.scale, enable_gqa=True
        )  # [B, H, max_q, D]
        o = o.transpose(1, 2).reshape(b * max_q, self.num_heads, self.head_dim)
        keep = torch.cat([torch.arange(r * max_q, r * max_q + n) for r, n in enumerate(qlens)]).to(device)
        return o.index_select(0, keep)
