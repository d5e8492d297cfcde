"""Paged decode attention as a Triton kernel (CUDA); prefill and the cache layout are the torch backend's.

The torch backend's decode gathers every sequence's K/V into a padded copy before its two batched GEMMs: a copy of
the whole context per layer per step. This kernel reads K/V in place through the block tables instead: one program
per (sequence, kv head) walks the sequence's blocks with an online softmax (flash-decoding without the split), the
query heads of the GQA group side by side, float32 accumulation. It takes the same padded static buffers as the
torch backend's decode, so decode steps replay as CUDA graphs the same way (``decode_graphs.py``).

Select it with ``--attention-backend triton`` (CUDA, Triton installed). It has not run on a GPU of this project yet
(none was lent; docs/gpu.md): the tests check it against the torch backend under Triton's interpreter on a CPU
where Triton is installed, and on a GPU when there is one (``scripts/device/bar5.sh``).
"""

from __future__ import annotations

from typing import Any

import torch

from tierserve.model_executor.attention.base import AttentionMetadata
from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend

_kernel: Any = None


def _paged_decode_kernel() -> Any:
    """The jitted kernel, defined on first use (importing Triton is deferred to the backend's first decode)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[misc]
    def paged_decode(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,  # type: ignore[no-untyped-def]
                     stride_qt, stride_qh, stride_kh, stride_kb, stride_tb, stride_ot,
                     G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        seq_len = tl.load(lens_ptr + b)
        offs_g = tl.arange(0, GP)
        offs_t = tl.arange(0, BS)
        offs_d = tl.arange(0, D)
        gmask = offs_g < G
        heads = h * G + offs_g
        q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None],
                    other=0.0).to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        denom = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for j in range(0, tl.cdiv(seq_len, BS)):
            blk = tl.load(tables_ptr + b * stride_tb + j)
            tmask = j * BS + offs_t < seq_len
            off = h * stride_kh + blk * stride_kb + offs_t[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + off, mask=tmask[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + off, mask=tmask[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / denom[:, None]
        tl.store(out_ptr + b * stride_ot + heads[:, None] * D + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])

    _kernel = paged_decode
    return _kernel


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] against each sequence's first seq_lens[b] cached tokens (caches [Hkv, num_blocks, bs, D],
    contiguous; block_tables [B, W] int64) -> [B, H * D] in q's dtype. D and bs must be powers of two."""
    b, h, d = q.shape
    hkv, _, bs, d2 = k_cache.shape
    assert d == d2 and h % hkv == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
    group = h // hkv
    q = q.contiguous()
    tables = block_tables.contiguous()
    out = torch.empty(b, h * d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    gp = 1 << (group - 1).bit_length()  # the group padded to a power of two (tl.arange's sizes)
    _paged_decode_kernel()[(b, hkv)](
        q, k_cache, v_cache, tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0), out.stride(0),
        G=group, GP=gp, BS=bs, D=d)
    return out


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class TritonAttentionBackend(TorchAttentionBackend):
    """The torch backend with decode through ``paged_decode`` (K/V read in place, no gathered copy)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        if not (_pow2(head_dim) and _pow2(block_size)):
            raise ValueError(f"the triton attention backend needs a power-of-two head_dim and block size, got "
                             f"{head_dim} and {block_size}; use --attention-backend torch")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ValueError("the triton attention backend needs the triton package (pip install triton); use "
                             "--attention-backend torch") from None

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale)
