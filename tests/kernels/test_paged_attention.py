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


@pytest.mark.parametrize("bs,d", [(8, 64), (24, 64), (10, 40), (16, 40), (64, 56)])
def test_float32_prefill_tiles_any_block_size_and_head_dim(bs: int, d: int) -> None:
    """float32 prefill items of >= 6 rows take the register-tiled path (keys in groups of 16, a block size that is not
    a multiple of 16 splits a group at the block's end; p.V in 16-feature slices, then the last 8 features alone):
    prompts whose last tile is partial, a later chunk, and decodes beside them."""
    q, k, v, cache, meta = _case(torch.float32, [3, 41], [(37, 37), (130, 51), (200, 200), (9, 2)], d=d, bs=bs)
    ref_cache = cache.clone()
    ref = TorchAttentionBackend(H, HKV, d, bs).forward(q, k, v, ref_cache, meta)
    out = CpuAttentionBackend(H, HKV, d, bs).forward(q, k, v, cache, meta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 48), (torch.float32, 48), (torch.float32, 96),
                                     (torch.float32, 20)])
def test_head_dims_off_the_fast_paths(dtype: torch.dtype, d: int) -> None:
    """bf16 head_dim 48 is not a multiple of 32: the portable loops run. float32 (AVX2): 48 and 96 take the vector path
    with a partial register set (96 = 64 + 32 features), 20 (not a multiple of 8) the portable loops. Same answers."""
    q, k, v, cache, meta = _case(dtype, [30, 7, 130], [(50, 20), (200, 70)], d=d)
    ref_cache = cache.float().clone()
    ref = TorchAttentionBackend(H, HKV, d, BS).forward(q.float(), k.float(), v.float(), ref_cache, meta)
    out = CpuAttentionBackend(H, HKV, d, BS).forward(q, k, v, cache, meta)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_bad_lengths_raise_not_crash() -> None:
    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    q, _, _, cache, meta = _case(torch.float32, [20], [])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode(q, cache, meta.decode_block_tables, torch.tensor([10_000]), 0.125)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.paged_decode(q.bfloat16(), cache, meta.decode_block_tables, meta.decode_seq_lens, 0.125)


def _qsplit(n: int) -> int:
    return 256 if n >= 768 else 64 if n >= 192 else 32


def _sdpa_case(kind: str, ctx: int, seed: int = 0, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    nb = (ctx + BS - 1) // BS
    nq = 1 if kind == "decode" else ctx
    k, v = (torch.randn(ctx, HKV, d, generator=g) * s for s in (2.0, 1.0))
    q = (torch.randn(nq, H, d, generator=g) * 2).bfloat16()
    cache = torch.zeros(2, HKV, nb * BS, d, dtype=torch.bfloat16)
    cache[0, :, :ctx], cache[1, :, :ctx] = k.transpose(0, 1), v.transpose(0, 1)
    return q, k.bfloat16(), v.bfloat16(), cache.view(2, HKV, nb, BS, d), torch.arange(nb).view(1, nb)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    import torch.nn.functional as F

    def heads(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [1, h, T, d]
        return x.transpose(0, 1).unsqueeze(0)

    d = q.shape[-1]
    return F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=d**-0.5, is_causal=causal,
                                          enable_gqa=True)[0].transpose(0, 1)


needs_bf16 = pytest.mark.skipif(not getattr(__import__("tierserve.kernels", fromlist=["cpu_ops"]).cpu_ops(),
                                            "has_avx512_bf16", False),
                                reason="the bf16 summation orders are the AVX-512-BF16 kernels'")
_has_amx = __import__("tierserve.utils.cpu", fromlist=["cpu_info"]).cpu_info().has_amx
avx512_orders = pytest.mark.skipif(
    _has_amx, reason="on AMX CPUs torch's flash attention sums on oneDNN's AMX tiles, not in these AVX-512 orders; "
    "the engine prefills through SDPA there (test_sdpa_prefill_chunks_sum_like_the_whole_prompt)")


@needs_bf16
@avx512_orders
@pytest.mark.parametrize("ctx", [1, 4, 5, 11, 12, 40, 193, 202, 333, 513, 700, 1100])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_bf16_is_bit_identical_to_torch_sdpa(kind: str, ctx: int) -> None:
    """transformers' reference runs torch's SDPA, whose CPU flash kernel sums in orders that depend on its call's
    shape: query blocks of 32/64/256 rows by prompt length, a BLAS that takes a different kernel for a block of 1-3
    rows or a kv split of a few keys, p.V in chunks of up to 192 keys, exp with its fast fexp_u20, the sum z in two
    interleaved accumulators. The kernels follow all of it, so every output element is SDPA's bit for bit (lengths
    here cover short splits, 1-row last blocks - 193, 513 -, a p.V chunk from an odd key - 202 - and several kv
    splits). Not covered: a last query block of 2-3 rows, whose p.V the library sums in yet another order (the
    kernels use the gemm order there)."""
    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    assert ops is not None
    q, k, v, cache, table = _sdpa_case(kind, ctx)
    d = q.shape[-1]
    if kind == "decode":
        ours = ops.paged_decode(q, cache, table, torch.tensor([ctx]), d**-0.5)
    else:
        ours = ops.paged_prefill(q, cache, table, torch.tensor([0, ctx]), torch.tensor([ctx]), d**-0.5, 32)
    ref = _sdpa(q, k, v, causal=kind == "prefill")
    assert ctx % _qsplit(ctx) not in (2, 3)
    assert torch.equal(ours, ref), (ours != ref).nonzero()[:5].tolist()


@needs_bf16
def test_decode_order_is_measured_and_exact() -> None:
    """Decode attention (one query row per sequence: transformers' every decode step) gets its summation order from
    the BLAS kernel MKL picks for a one-row block, which differs by CPU ("gemv4" on the AMD EPYC Zen 4, "ymm8" on a
    Xeon with AMX); the engine measures it at load with probes built to tell the orders apart. Under the measured
    order, decode equals SDPA bit for bit on random data at every context length here (short splits, one and
    several kv splits, a partial last block)."""
    from tierserve.kernels import cpu_ops
    from tierserve.kernels.attention_order import ORDERS, torch_decode_order

    ops = cpu_ops()
    assert ops is not None
    order = torch_decode_order(ops, 64)
    if _has_amx:
        assert order == 1, order  # measured: torch 2.13's MKL on a Xeon with AMX
    if order is None:
        pytest.skip("neither native decode order reproduces torch's SDPA on this CPU (the AVX-512 tests above "
                    "cover the EPYC's)")
    before = ops.decode_order()
    ops.set_decode_order(order)
    try:
        for ctx in (1, 3, 5, 11, 12, 40, 193, 333, 513, 700, 1100):
            q, k, v, cache, table = _sdpa_case("decode", ctx)
            d = q.shape[-1]
            ours = ops.paged_decode(q, cache, table, torch.tensor([ctx]), d**-0.5)
            assert torch.equal(ours, _sdpa(q, k, v, causal=False)), (ORDERS[order], ctx)
    finally:
        ops.set_decode_order(before)
    with pytest.raises(RuntimeError, match="0 \\(gemv4\\) or 1"):
        ops.set_decode_order(2)


def _sdpa_keeps_denormal_products() -> bool:
    """Whether this CPU's SDPA keeps a denormal p x v product in its bf16 p.V GEMM. Two keys: the first takes the
    softmax weight 1 with v = 0, the second ~e^-2 with v = 2e-38, so the output is that one product, denormal. A
    GEMM on VDPBF16PS or AMX tiles (and our kernel) flushes it to zero (those instructions always do); MKL's
    bf16 GEMM on the Zen 5 EPYC (family 26) keeps it."""
    q = torch.zeros(1, 1, 64)
    q[0, 0, 0] = 8.0
    k = torch.zeros(2, 1, 64)
    k[0, 0, 0] = 2.0  # scores 16 / 8 = 2 and 0
    v = torch.zeros(2, 1, 64)
    v[1] = 2e-38
    out = _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=False)
    return bool((out != 0).any())


@needs_bf16
@pytest.mark.parametrize("scale", [3e-38, 1e-37])
def test_decode_rounds_tiny_outputs_like_sdpa(scale: float) -> None:
    """Values near bf16's smallest normal: the outputs' rounding to bf16 keeps denormal results, as SDPA does (the
    hardware bf16 conversion would flush them to zero)."""
    from tierserve.kernels import cpu_ops
    from tierserve.kernels.attention_order import torch_decode_order

    ops = cpu_ops()
    assert ops is not None
    if _sdpa_keeps_denormal_products():
        # the products below the smallest normal differ before any rounding of outputs: our dot products flush
        # them (VDPBF16PS always does), this CPU's SDPA keeps them; normal-range values agree bit for bit
        # (test_bf16_is_bit_identical_to_torch_sdpa, the bf16 exactness test)
        pytest.skip("this CPU's SDPA keeps denormal p x v products, which VDPBF16PS flushes")
    order = torch_decode_order(ops, 64)
    if order is None:
        pytest.skip("neither native decode order reproduces torch's SDPA on this CPU")
    before = ops.decode_order()
    ops.set_decode_order(order)
    try:
        for ctx in (40, 333):
            q, k, _, cache, table = _sdpa_case("decode", ctx)
            g = torch.Generator().manual_seed(1)
            v = (torch.sign(torch.randn(ctx, HKV, 64, generator=g)) * scale
                 * (1 + torch.rand(ctx, HKV, 64, generator=g))).bfloat16()
            cache[1].view(HKV, -1, 64)[:, :ctx] = v.transpose(0, 1)
            ref = _sdpa(q, k, v, causal=False)
            assert ((ref.float().abs() < torch.finfo(torch.float32).tiny) & (ref != 0)).any()  # denormals to keep
            ours = ops.paged_decode(q, cache, table, torch.tensor([ctx]), 64**-0.5)
            assert torch.equal(ours, ref), (scale, ctx, int((ours != ref).sum()))
    finally:
        ops.set_decode_order(before)


@needs_bf16
@avx512_orders
@pytest.mark.parametrize("ctx,chunk", [(333, 100), (1100, 600), (200, 199)])
def test_bf16_chunked_prefill_sums_like_the_whole_prompt(ctx: int, chunk: int) -> None:
    """A prompt prefilled in two chunks (the second reading the first's K/V from the cache) gives the bits of one
    SDPA call over the whole prompt when the kernel is told the prompt's length (ref_lens)."""
    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    assert ops is not None
    q, k, v, cache, table = _sdpa_case("prefill", ctx, seed=1)
    d = q.shape[-1]
    ref = _sdpa(q, k, v, causal=True)
    parts = [ops.paged_prefill(q[a:b], cache, table, torch.tensor([0, b - a]), torch.tensor([b]), d**-0.5, 32,
                               torch.tensor([ctx])) for a, b in ((0, chunk), (chunk, ctx))]
    assert torch.equal(torch.cat(parts), ref)
    with pytest.raises(RuntimeError, match="ref_lens below seq_lens"):
        ops.paged_prefill(q[:chunk], cache, table, torch.tensor([0, chunk]), torch.tensor([chunk]), d**-0.5, 32,
                          torch.tensor([chunk - 1]))


@pytest.mark.parametrize("ctx,chunk", [(333, 100), (1100, 600), (200, 199)])
def test_sdpa_prefill_chunks_sum_like_the_whole_prompt(ctx: int, chunk: int) -> None:
    """With ``sdpa_prefill`` (CPUs with AMX), each chunk of a prompt runs the single SDPA call transformers makes over
    the whole prompt (its rows among zero queries, later keys zero), so a prompt prefilled in two chunks gets that
    call's bits exactly; without the prompt's length it falls back to a masked call over the chunk's own context."""
    q, k, v, cache, table = _sdpa_case("prefill", ctx, seed=1)
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    backend = CpuAttentionBackend(h, hkv, d, cache.shape[3])
    backend.sdpa_prefill = True
    ref = _sdpa(q, k, v, causal=True).reshape(ctx, h * d)

    def meta(a: int, b: int, ref_len: int | None) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.arange(a, b), num_decode_tokens=0,
            decode_block_tables=torch.zeros(0, 1, dtype=torch.long), decode_seq_lens=torch.zeros(0, dtype=torch.long),
            prefill_query_lens=[b - a], prefill_seq_lens=[b],
            prefill_block_tables=table, prefill_query_start=torch.tensor([0, b - a]),
            prefill_ref_lens_t=None if ref_len is None else torch.tensor([ref_len]))

    parts = [backend.attend(q[a:b], cache, meta(a, b, ctx)) for a, b in ((0, chunk), (chunk, ctx))]
    assert torch.equal(torch.cat(parts), ref)
    masked = backend.attend(q[chunk:], cache, meta(chunk, ctx, None))
    torch.testing.assert_close(masked.float(), ref[chunk:].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("decodes,prefills", [([], [(40, 40)]), ([], [(256, 256)] * 3),
                                              ([5, 64, 200], [(17, 17), (300, 44), (65, 1), (33, 33)]),
                                              ([9], [(40, 40)] * 2 + [(33, 33)] + [(40, 40)] * 3 + [(90, 40)])])
def test_sdpa_prefill_reads_a_whole_prompts_kv_from_the_step_like_from_the_cache(
        decodes: list[int], prefills: list[tuple[int, int]]) -> None:
    """A whole-prompt chunk takes its K/V from the step's own rows (``attend(..., kv)``) instead of gathering them
    out of the cache, and consecutive whole prompts of one length go through SDPA as one batched call: the same
    values and the same per-prompt blocking, so the same bits as one call per prompt from the cache; other chunks
    of the step still read the cache."""
    q, k, v, cache, meta = _case(torch.bfloat16, decodes, prefills)
    backend = CpuAttentionBackend(H, HKV, q.shape[2], BS)
    backend.sdpa_prefill = True
    direct = backend.forward(q, k, v, cache, meta)  # writes k/v into the cache, then attends with them
    gathered = backend.attend(q, cache, meta)
    assert torch.equal(direct, gathered)
    wrong = backend.attend(q, cache, meta, (torch.zeros_like(k), torch.zeros_like(v)))
    assert not torch.equal(wrong, gathered), "the step's own k/v were not used"


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_outputs_do_not_depend_on_the_threads(threads: int) -> None:
    """Work items are handed out from a shared counter (``csrc/parallel.h``): whichever thread takes an item, and in
    whatever order, each output is written by one item - the same bits as with one thread, for decode, prefill
    (items handed out dearest first) and the bf16 linear kernels."""
    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    assert ops is not None
    q, k, v, cache, meta = _case(torch.bfloat16, [5, 300, 64, 17, 200, 1, 33], [(700, 700), (300, 44), (65, 1)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(75, 576, generator=g).bfloat16()
    wp = ops.pack_vnni((torch.randn(960, 576, generator=g) * 0.05).bfloat16())

    def run() -> list[torch.Tensor]:
        c = cache.clone()
        outs = [CpuAttentionBackend(H, HKV, 64, BS).forward(q, k, v, c, meta), c,
                ops.paged_prefill(q[meta.num_decode_tokens:], c, meta.prefill_block_tables, meta.prefill_query_start,
                                  meta.prefill_seq_lens_t, 0.125, 32, None),
                ops.linear_vnni(x, wp, None, 0, 0, 0)]
        if ops.amx_available():
            outs.append(ops.linear_amx(x, wp, None, 0))
        return outs

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(threads)
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(one, run()))
    finally:
        torch.set_num_threads(before)
