"""Paged attention through the native CPU kernels (``tierserve/kernels/csrc/paged_attention.cpp``).

Same cache layout as the torch backend (``[2, Hkv, num_blocks, block_size, D]``), so the two are interchangeable
and the torch one stays the reference. Decode and prefill chunks read K/V in place through the block tables: no
gather copy, no padding, no mask tensor, float32 accumulation. Decodes and prefill chunks run as two kernel calls
per layer, whatever the mix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops
from tierserve.model_executor.attention.base import AttentionMetadata
from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend

PREFILL_TILE = 32
"""Query tokens per prefill work item (load balance across threads; K/V of a tile's context stay in cache)."""


def available() -> bool:
    return cpu_ops() is not None


class CpuAttentionBackend(TorchAttentionBackend):
    native_decode = True
    """Whether a decode-only step may run every layer in one native call (``decode_layers``, this backend's kernel)."""
    sdpa_prefill = False
    """Prefill chunks through torch's SDPA per sequence (as the reference backend) instead of the native kernel. Set
    on CPUs with AMX: there torch's flash attention sums on oneDNN's AMX tiles, in orders the native prefill kernel
    (written after its AVX-512 orders) does not follow, and SDPA itself is fast on AMX; decode stays native."""

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
        return self.attend(q, kv_cache, meta, (k, v))

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attention for q [T, H, D] whose K/V are already in the cache (the fused RoPE + cache-write op put them
        there) -> [T, H * D]. ``kv``: the step's own k and v [T, Hkv, D] (views are fine), which a chunk holding a
        whole prompt reads instead of gathering them back from the cache."""
        num_tokens = q.shape[0]
        nd = meta.num_decode_tokens
        parts = []
        if nd:
            parts.append(self.ops.paged_decode(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                               self.scale))
        if nd < num_tokens and self.sdpa_prefill:
            parts = [p.reshape(p.shape[0], -1) for p in parts] + self._sdpa_prefills(q, kv_cache, meta, kv)
        elif nd < num_tokens:
            seq_lens = meta.prefill_seq_lens_t
            if seq_lens is None:
                seq_lens = torch.tensor(meta.prefill_seq_lens, dtype=torch.long)
            parts.append(self.ops.paged_prefill(q[nd:], kv_cache, meta.prefill_block_tables,
                                                meta.prefill_query_start, seq_lens, self.scale, PREFILL_TILE,
                                                meta.prefill_ref_lens_t))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return o.view(num_tokens, self.num_heads * self.head_dim)

    def _kv(self, kv_cache: torch.Tensor, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's K and V gathered from the paged cache: [1, Hkv, length, D] each."""
        k = self._gather(kv_cache[0], table)[:, 0, :length]
        v = self._gather(kv_cache[1], table)[:, 0, :length]
        return k.unsqueeze(0), v.unsqueeze(0)

    def _sdpa(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        """rows [n, H, D] against one sequence's K/V through torch's SDPA -> [n, H * D]."""
        o = F.scaled_dot_product_attention(rows.transpose(0, 1).unsqueeze(0), k, v, scale=self.scale,
                                           enable_gqa=self.num_kv_heads != self.num_heads, **kw)
        return o[0].transpose(0, 1).reshape(rows.shape[0], self.num_heads * self.head_dim)

    def _sdpa_prefills(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each prefill chunk as transformers computes it: SDPA with ``is_causal`` over its whole prompt. A chunk of a
        longer prompt (``prefill_ref_lens_t``) runs that same call, its rows in place among zero queries and the keys
        past its end zero (causal: never read by its rows), so its rows sum exactly as in the whole call - the
        kernel's blocking depends on the call's lengths. Without a reference length (a recomputed sequence, a prefix-
        cache hit) a later chunk runs with a bottom-right causal mask instead. With ``kv`` a whole prompt takes its
        K/V from the step's own rows (the same values; no gather copy out of the cache), and a run of consecutive
        whole prompts of one length is one batched call (no Python loop over them; 0.84x the attention time of 64
        per-prompt calls of 256 tokens, ad hoc)."""
        nd = meta.num_decode_tokens
        outs: list[torch.Tensor] = []
        starts = meta.prefill_query_start.tolist()
        refs = meta.prefill_ref_lens_t.tolist() if meta.prefill_ref_lens_t is not None else meta.prefill_seq_lens
        items = list(zip(meta.prefill_query_lens, meta.prefill_seq_lens, refs))
        j = 0
        while j < len(items):
            qlen, slen, ref = items[j]
            first_row = nd + starts[j]
            rows = q[first_row: first_row + qlen]
            if qlen == slen == ref and kv is not None:  # the whole prompt is this step's rows
                # and so may the next prompts be: a run of whole prompts of one length is one batched call (rows
                # back to back in the step; SDPA's blocking depends on the length, not the batch: the same bits)
                n = 1
                while j + n < len(items) and items[j + n] == (qlen, qlen, qlen):
                    n += 1
                span = slice(first_row, first_row + n * qlen)
                outs.append(self._sdpa_run(q[span], kv[0][span], kv[1][span], n))
                j += n
                continue
            k, v = self._kv(kv_cache, meta.prefill_block_tables[j:j + 1], slen)
            if qlen == slen == ref:
                outs.append(self._sdpa(rows, k, v, is_causal=True))
            elif ref >= slen:  # a chunk of a prompt whose whole length is known
                first = slen - qlen
                full = rows.new_zeros((ref,) + tuple(rows.shape[1:]))
                full[first:slen] = rows
                pad = (0, 0, 0, ref - slen)
                o = self._sdpa(full, F.pad(k, pad), F.pad(v, pad), is_causal=True)
                outs.append(o[first:slen])
            else:  # bottom-right causal: row i sees keys up to slen - qlen + i
                mask = torch.arange(slen)[None, :] <= (slen - qlen + torch.arange(qlen))[:, None]
                outs.append(self._sdpa(rows, k, v, attn_mask=mask))
            j += 1
        return outs

    def _sdpa_run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        """n whole prompts of one length, back to back: q [n * L, H, D], k/v [n * L, Hkv, D] -> [n * L, H * D],
        each prompt causal over itself - one SDPA call with batch n."""
        length = q.shape[0] // n
        qb, kb, vb = (t.view(n, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=self.scale, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return o.transpose(1, 2).reshape(q.shape[0], self.num_heads * self.head_dim)


class ReferenceAttentionBackend(CpuAttentionBackend):
    """The native model path with attention computed the way transformers computes it: torch's SDPA called once per
    sequence on that sequence's keys and values (gathered from the paged cache), a whole prompt with ``is_causal``.
    SDPA's CPU flash kernel sums its dot products in orders that depend on the call's shape (its BLAS picks a
    different kernel for a single query row), so only the same calls give the same bits: with this backend (and the
    linear and RMSNorm kernels, which follow torch's orders everywhere) bf16 greedy tokens equal transformers-bf16's
    (tests/engine/test_exactness_bf16.py). It costs a Python loop over sequences per layer, so it is for checking
    numerics, not for serving. A prompt prefilled in chunks or after a prefix-cache hit runs its later part with an
    explicit mask, which is not the call transformers makes (close, not always the same bits)."""

    native_decode = False

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        nd = meta.num_decode_tokens
        outs: list[torch.Tensor] = []
        for i in range(nd):
            length = int(meta.decode_seq_lens[i])
            outs.append(self._sdpa(q[i:i + 1], *self._kv(kv_cache, meta.decode_block_tables[i:i + 1], length)))
        outs += self._sdpa_prefills(q, kv_cache, meta, kv)
        return outs[0] if len(outs) == 1 else torch.cat(outs)
