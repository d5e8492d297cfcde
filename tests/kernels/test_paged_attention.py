"""The native CPU paged-attention kernels against the plain-torch backend (the reference), same cache layout."""

from __future__ import annotations

import pytest
import torch

from tierserve.model_executor.attention.base import AttentionMetadata
from tierserve.model_executor.attention.cpu_backend import CpuAttentionBackend, available
from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.skipif(not available(), reason="native kernels cannot be built here")

H, HKV, BS = 9, 3, 16


def _case(dtype: torch.dtype, decode_ctx: list[int], prefill: list[tuple[int, int]], d: int = 64, seed: int = 0,
          bs: int = BS):
    """A step with decodes (context lengths) then prefill chunks (context, chunk length), random block tables."""
    g = torch.Generator().manual_seed(seed)
    ctxs = decode_ctx + [c for c, _ in prefill]
    qlens = [1] * len(decode_ctx) + [n for _, n in prefill]
    maxb = max((c + bs - 1) // bs for c in ctxs)
    nb = len(ctxs) * maxb + 3
    cache = torch.randn(2, HKV, nb, bs, d, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[: len(ctxs) * maxb].view(len(ctxs), maxb)
    t = sum(qlens)
    q, k, v = (torch.randn(t, n, d, generator=g).to(dtype) for n in (H, HKV, HKV))
    slots = [int(tables[i, p // bs]) * bs + p % bs
             for i, (c, n) in enumerate(zip(ctxs, qlens)) for p in range(c - n, c)]
    nd = len(decode_ctx)
    qstart = [0]
    for _, n in prefill:
        qstart.append(qstart[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decode_tokens=nd, decode_block_tables=tables[:nd].contiguous(),
        decode_seq_lens=torch.tensor(decode_ctx, dtype=torch.long), prefill_query_lens=[n for _, n in prefill],
        prefill_seq_lens=[c for c, _ in prefill], prefill_block_tables=tables[nd:].contiguous(),
        prefill_query_start=torch.tensor(qstart), prefill_seq_lens_t=torch.tensor([c for c, _ in prefill]),
    )
    return q, k, v, cache, meta


CASES = [
    ([1], []),  # first decode step of a 1-token prompt
    ([17, 300, 33, 64], []),  # decodes of different lengths, block boundaries
    ([], [(40, 40)]),  # one whole prompt
    ([], [(300, 100)]),  # a later chunk of a long prompt (context from the cache)
    ([], [(256, 256)] * 3),  # several whole prompts
    ([5, 64, 200], [(17, 17), (300, 44), (65, 1)]),  # mixed step
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decodes,prefills", CASES)
def test_matches_torch_backend(dtype: torch.dtype, decodes: list[int], prefills: list[tuple[int, int]]) -> None:
    q, k, v, cache, meta = _case(dtype, decodes, prefills)
    ref_cache = cache.float().clone()
    ref = TorchAttentionBackend(H, HKV, 64, BS).forward(q.float(), k.float(), v.float(), ref_cache, meta)
    out = CpuAttentionBackend(H, HKV, 64, BS).forward(q, k, v, cache, meta)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(cache.float(), ref_cache.to(dtype).float())  # same K/V written, same slots
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output rounding only (accumulation is fp32)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_larger_than_16_tokens(dtype: torch.dtype) -> None:
    """Block size 32: the bf16 path scores each block as two 16-key chunks (the last one partial)."""
    q, k, v, cache, meta = _case(dtype, [45, 70], [(90, 30)], bs=32)
    ref_cache = cache.float().clone()
    ref = TorchAttentionBackend(H, HKV, 64, 32).forward(q.float(), k.float(), v.float(), ref_cache, meta)
    out = CpuAttentionBackend(H, HKV, 64, 32).forward(q, k, v, cache, meta)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_head_dim_without_bf16_fast_path() -> None:
    """head_dim 48 is not a multiple of 32: the portable loops run, same answers."""
    q, k, v, cache, meta = _case(torch.bfloat16, [30, 7], [(50, 20)], d=48)
    ref_cache = cache.float().clone()
    ref = TorchAttentionBackend(H, HKV, 48, BS).forward(q.float(), k.float(), v.float(), ref_cache, meta)
    out = CpuAttentionBackend(H, HKV, 48, BS).forward(q, k, v, cache, meta)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_bad_lengths_raise_not_crash() -> None:
    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    q, _, _, cache, meta = _case(torch.float32, [20], [])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode(q, cache, meta.decode_block_tables, torch.tensor([10_000]), 0.125)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.paged_decode(q.bfloat16(), cache, meta.decode_block_tables, meta.decode_seq_lens, 0.125)


@pytest.mark.parametrize("ctx", [40, 333, 700, 1100])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_bf16_rounds_like_torch_sdpa(kind: str, ctx: int) -> None:
    """transformers' reference runs torch's SDPA, whose CPU flash kernel splits the keys into blocks of 512 with an
    online softmax, takes exp with its fast ``fexp_u20`` on whole vectors of 16 (std::exp on the rest), rounds
    exp(s - max) to bf16 before p·V and divides by the fp32 sum at the end. The kernel does the same, so on
    AVX-512-BF16 CPUs nearly every output element is bit-identical to SDPA's (measured 99.9-100%; an fp32 softmax
    matches only ~75-85% of them). Only the dot products' summation order differs (a GEMM library's, by shape)."""
    import torch.nn.functional as F

    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    assert ops is not None
    g = torch.Generator().manual_seed(ctx)
    d, nb = 64, (ctx + BS - 1) // BS
    nq = 1 if kind == "decode" else ctx
    k, v = (torch.randn(ctx, HKV, d, generator=g) * s for s in (2.0, 1.0))
    q = (torch.randn(nq, H, d, generator=g) * 2).bfloat16()
    cache = torch.zeros(2, HKV, nb * BS, d, dtype=torch.bfloat16)
    cache[0, :, :ctx], cache[1, :, :ctx] = k.transpose(0, 1), v.transpose(0, 1)
    cache = cache.view(2, HKV, nb, BS, d)
    table = torch.arange(nb).view(1, nb)
    if kind == "decode":
        ours = ops.paged_decode(q, cache, table, torch.tensor([ctx]), d**-0.5)
    else:
        ours = ops.paged_prefill(q, cache, table, torch.tensor([0, ctx]), torch.tensor([ctx]), d**-0.5, 32)

    def heads(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [1, h, T, d]
        return x.bfloat16().transpose(0, 1).unsqueeze(0)

    causal = kind == "prefill"
    ref = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=d**-0.5, is_causal=causal,
                                         enable_gqa=True)[0].transpose(0, 1)
    fp32 = F.scaled_dot_product_attention(heads(q).float(), heads(k).float(), heads(v).float(), scale=d**-0.5,
                                          is_causal=causal, enable_gqa=True)[0].transpose(0, 1).bfloat16()
    same, same_fp32 = ((x == ref).float().mean().item() for x in (ours, fp32))
    floor = 0.999 if getattr(ops, "has_avx512_bf16", False) else 0.95
    assert same >= floor and same >= same_fp32 + 0.1, (same, same_fp32)
