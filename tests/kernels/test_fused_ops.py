"""The native fused ops against the torch code they replace (the unfused model path, which follows transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops
from tierserve.model_executor.models.llama import rms_norm
from tierserve.model_executor.models.rope import apply_rope
from tierserve.utils.cpu import cpu_info

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="native kernels cannot be built here")
DTYPES = [torch.float32, torch.bfloat16]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("n", [576, 17, 100, 960, 3000, 70000])
def test_rms_norm_is_bit_identical_to_torch(dtype: torch.dtype, with_delta: bool, n: int) -> None:
    """The mean of squares is summed in the order of torch's sum kernel (8-float vectors, 4 interleaved cascades,
    scalar tail, then the lanes), so the norm equals transformers' bit for bit in both dtypes: row lengths with a
    scalar tail (17, 100), leftover vectors (960) and the cascade's level flushes (3000, 70000)."""
    x = (torch.randn(7, n, generator=_g()) * 3).to(dtype)
    d = torch.randn(7, n, generator=_g(1)).to(dtype) if with_delta else None
    w = torch.randn(n, generator=_g(2)).to(dtype)
    ref_x = x + d if d is not None else x.clone()
    ref = rms_norm(ref_x, w, 1e-5)
    out = ops.rms_norm(x, d, w, 1e-5)
    assert torch.equal(x, ref_x)  # the residual add happened in place, same rounding
    assert torch.equal(out, ref)


@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm_rounds_extremes_like_torch(with_delta: bool) -> None:
    """Magnitudes from 1e-30 to 1e15 in one row and weights down to bf16's denormals: the vector path rounds the
    residual add, the normalised x and its product with w as c10's conversion does (denormals kept, not flushed)."""
    g = _g(3)
    n = 576 + 7
    mag = torch.pow(10.0, torch.empty(5, n).uniform_(-30, 15, generator=g))
    x = (torch.randn(5, n, generator=g) * mag).bfloat16()
    d = (torch.randn(5, n, generator=g) * mag).bfloat16() if with_delta else None
    w = (torch.randn(n, generator=g) * torch.pow(10.0, torch.empty(n).uniform_(-39, 2, generator=g))).bfloat16()
    ref_x = x + d if d is not None else x.clone()
    ref = rms_norm(ref_x, w, 1e-5)
    out = ops.rms_norm(x, d, w, 1e-5)
    assert torch.equal(x, ref_x)
    assert torch.equal(out, ref)
    assert ((ref != 0) & (ref.float().abs() < 1.18e-38)).any()  # the case has denormal outputs to round


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_matches_torch(dtype: torch.dtype) -> None:
    h, hkv, d, bs, nb, t = 9, 3, 64, 16, 10, 5
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=_g()).to(dtype)
    cos = torch.randn(t, d, generator=_g(1)).to(dtype)
    sin = torch.randn(t, d, generator=_g(2)).to(dtype)
    slots = torch.tensor([3, 17, 18, 100, 159])
    cache = torch.zeros(2, hkv, nb, bs, d, dtype=dtype)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    ref_q = apply_rope(q.reshape(t, h, d), cos, sin)
    ref_k = apply_rope(k.reshape(t, hkv, d), cos, sin)
    ref_cache = torch.zeros_like(cache)
    ref_cache[0].view(hkv, -1, d).index_copy_(1, slots, ref_k.transpose(0, 1))
    ref_cache[1].view(hkv, -1, d).index_copy_(1, slots, v.reshape(t, hkv, d).transpose(0, 1))
    work = qkv.clone()
    ops.rope_and_cache(work, cos, sin, cache, slots, h, hkv)
    # bf16: bit-identical (same rounding steps); float32: up to fused multiply-add contraction
    exact = dict(atol=0.0, rtol=0.0) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(work[:, : h * d].view(t, h, d), ref_q, **exact)
    torch.testing.assert_close(cache, ref_cache, **exact)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.rope_and_cache(qkv.clone(), cos, sin, cache, torch.tensor([0, 1, 2, 3, nb * bs]), h, hkv)


@pytest.mark.parametrize("inter", [1536, 13])  # 13: the vector loops' tails
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    gu = torch.randn(6, 2 * inter, generator=_g()).to(dtype) * 4
    g, u = gu.split([inter, inter], dim=-1)
    ref = F.silu(g) * u
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ops.silu_mul(gu).float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("scale", [4.0, 30.0])
def test_silu_mul_bf16_is_bit_identical_to_torch(scale: float) -> None:
    """bf16 SiLU·up takes F.silu's exp (torch's own, via ATen's vector type) and rounds where F.silu(g) * u rounds, so
    the outputs are the same bits - also for large |g|, where an exp that clamps differs (-0 vs a tiny value)."""
    gu = (torch.randn(64, 2 * 1536, generator=_g()) * scale).bfloat16()
    g, u = gu.split([1536, 1536], dim=-1)
    assert torch.equal(ops.silu_mul(gu).view(torch.int16), (F.silu(g) * u).view(torch.int16))


needs_vnni = pytest.mark.skipif(
    not getattr(ops, "has_avx512_bf16", False),
    reason="linear_vnni's vector path needs AVX-512-BF16 (the portable loop is tested there)")


@pytest.mark.parametrize("m", [0, 1, 3, 9, 20])
@pytest.mark.parametrize("n,k", [(960, 576), (32, 70), (48, 1535)])
def test_linear_vnni_matches_fp32_reference(m: int, n: int, k: int) -> None:
    """bf16 in/out, fp32 accumulation: within one bf16 rounding of the exact product; an odd K is padded, a row
    count that is not a multiple of the 8-row tile takes the smaller tiles."""
    x = torch.randn(m, k, generator=_g()).bfloat16()
    w = (torch.randn(n, k, generator=_g(1)) * 0.05).bfloat16()
    b = torch.randn(n, generator=_g(2)).bfloat16()
    wp = ops.pack_vnni(w)
    ref = F.linear(x.float(), w.float(), b.float())
    out = ops.linear_vnni(x, wp, b)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(ops.linear_vnni(x, wp).float(), F.linear(x.float(), w.float()), atol=1e-2, rtol=8e-3)


@needs_vnni
@pytest.mark.skipif(cpu_info().has_amx, reason="on AMX CPUs torch's bf16 linear sums on oneDNN's AMX tiles, in an "
                    "order linear_vnni cannot follow; the engine uses linear_amx there (tested below)")
@pytest.mark.parametrize("m", [1, 4, 16, 200])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (3072, 576)])
def test_linear_vnni_with_torchs_k_blocking_is_bit_identical(m: int, n: int, k: int) -> None:
    """linear_order measures the K blocking of torch's bf16 linear for the shape (one row, several rows); with it
    every output equals F.linear's bit for bit - one row at a time (as transformers decodes) and as a batch - where
    one chain over all of K differs in a few outputs in a thousand."""
    from tierserve.kernels.linear_order import torch_k_chunks

    one, several = torch_k_chunks(ops, n, k)
    x = torch.randn(m, k, generator=_g()).bfloat16()
    w = (torch.randn(n, k, generator=_g(1)) * 0.05).bfloat16()
    wp = ops.pack_vnni(w)
    assert torch.equal(ops.linear_vnni(x, wp, None, one if m == 1 else several), F.linear(x, w))
    per_row = torch.cat([F.linear(x[i:i + 1], w) for i in range(m)])
    assert torch.equal(ops.linear_vnni(x, wp, None, several, m, one), per_row)
    if m >= 4:  # the first rows one way, the rest the other (a mixed step: decode rows, then prefill rows)
        lead = m // 2
        mixed = torch.cat([per_row[:lead], F.linear(x[lead:], w)])
        assert torch.equal(ops.linear_vnni(x, wp, None, several, lead, one), mixed)


@pytest.mark.skipif(not (ops is not None and ops.amx_available()), reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("m", [1, 3, 16, 32, 60, 200, 300, 600])
@pytest.mark.parametrize("n,k", [(960, 576), (192, 576), (576, 1536), (3072, 576)])
def test_linear_amx_is_bit_identical_to_torch(m: int, n: int, k: int) -> None:
    """On AMX, linear_amx from the linear_vnni packing equals torch's bf16 linear bit for bit: up to 32 rows with one
    chain over K (and each row as if alone, as transformers decodes), above that with the K chunks oneDNN picks for
    the row count (AmxKChunks, measured on first use; K = 1536 at 300 rows: quarters added as a pairwise tree). The
    bias lands before the rounding to bf16, as in F.linear."""
    from tierserve.kernels.linear_order import AmxKChunks

    chunks = AmxKChunks(ops)
    x = torch.randn(m, k, generator=_g()).bfloat16()
    w = (torch.randn(n, k, generator=_g(1)) * 0.05).bfloat16()
    wp = ops.pack_vnni(w)
    c = chunks(n, k, m)
    assert (c == 0) if m <= 32 else (c % 32 == 0)
    assert torch.equal(ops.linear_amx(x, wp, None, c), F.linear(x, w)), c
    if m <= 32:
        assert torch.equal(ops.linear_amx(x, wp, None, 0), torch.cat([F.linear(x[i:i + 1], w) for i in range(m)]))
    b = torch.randn(n, generator=_g(2)).bfloat16()
    torch.testing.assert_close(ops.linear_amx(x, wp, b, c).float(), F.linear(x, w, b).float(), atol=1e-2, rtol=8e-3)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.linear_amx(x, wp, None, 48)
    with pytest.raises(RuntimeError, match="at most 8 K chunks"):
        ops.linear_amx(x, wp, None, -32)


@pytest.mark.skipif(not (ops is not None and ops.amx_available()), reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("m", [5, 37, 300])
def test_linear_amx_writes_rows_and_parts_of_a_larger_result_in_place(m: int) -> None:
    """``out``: each call writes its own rows / output columns of one result (what the model does for a step whose
    rows or fused parts need different K chunks) - the same bits as separate calls, nothing outside its view touched;
    a view of the wrong shape or with strided columns is refused."""
    n, k = 960, 576
    x = torch.randn(m, k, generator=_g()).bfloat16()
    wp = ops.pack_vnni((torch.randn(n, k, generator=_g(1)) * 0.05).bfloat16())
    b = torch.randn(n, generator=_g(2)).bfloat16()
    big = torch.full((m + 3, n + 64), 7.0, dtype=torch.bfloat16)
    r0 = m // 2
    for rows, chunk in ((slice(0, r0), 0), (slice(r0, m), 288)):  # row segments, the second split in parts
        if chunk == 0:
            ret = ops.linear_amx(x[rows], wp, b, chunk, False, big[1:, 32:32 + n][rows])
            assert ret.data_ptr() == big[1:, 32:][rows].data_ptr()
            continue
        for lo, hi in ((0, 576), (576, 960)):
            ops.linear_amx(x[rows], wp[lo // 16:hi // 16], b[lo:hi], chunk, False, big[1:, 32 + lo:32 + hi][rows])
    assert torch.equal(big[1:m + 1, 32:32 + n][:r0], ops.linear_amx(x[:r0], wp, b, 0))
    assert torch.equal(big[1:m + 1, 32:32 + n][r0:], ops.linear_amx(x[r0:], wp, b, 288))
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[1:m + 1, 32:32 + n] = False
    assert bool((big[untouched] == 7.0).all())
    with pytest.raises(RuntimeError, match="out must be"):
        ops.linear_amx(x, wp, None, 0, False, big[:m, :n - 16])
    with pytest.raises(RuntimeError, match="out must be"):
        ops.linear_amx(x, wp, None, 0, False, big[:m, : 2 * n : 2])


@pytest.mark.skipif(not (ops is not None and ops.amx_available()), reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("m", [1, 7, 16, 33, 200, 600])
@pytest.mark.parametrize("k_chunk", [0, 288, -192])
@pytest.mark.parametrize("inter", [320, 336])
def test_linear_amx_swiglu_epilogue_equals_silu_mul_of_the_projection(m: int, k_chunk: int, inter: int) -> None:
    """With the gate/up weight interleaved, linear_amx's SwiGLU epilogue gives silu(gate) * up bit for bit as
    silu_mul over the plain projection does - and that is F.silu(gate) * up of transformers' separate linears.
    (An even number of (gate, up) pairs goes out to the threads two at a time, an odd one singly; each block's
    epilogue runs during the next block's K steps, the last one's at the end.)"""
    from tierserve.model_executor.models.llama import interleave_gate_up

    k = 576
    x = torch.randn(m, k, generator=_g()).bfloat16() * 3  # wide enough that silu meets large and negative inputs
    w = (torch.randn(2 * inter, k, generator=_g(1)) * 0.05).bfloat16()
    wp = ops.pack_vnni(w)
    out = ops.linear_amx(x, interleave_gate_up(wp), None, k_chunk, True)
    assert out.shape == (m, inter)
    assert torch.equal(out, ops.silu_mul(ops.linear_amx(x, wp, None, k_chunk)))
    if k_chunk == 0 and m <= 32:
        ref = torch.cat([F.silu(F.linear(x[i:i + 1], w[:inter])) * F.linear(x[i:i + 1], w[inter:]) for i in range(m)])
        assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="no bias"):
        ops.linear_amx(x, wp, torch.zeros(2 * inter).bfloat16(), 0, True)


@pytest.mark.skipif(not (ops is not None and ops.amx_available()), reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("swiglu", [False, True])
def test_linear_amx_does_not_depend_on_the_threads(swiglu: bool) -> None:
    """Blocks are handed out from a shared counter and a block's epilogue may run on whichever thread computed it,
    during its next block: the result is the same with any number of threads."""
    from tierserve.model_executor.models.llama import interleave_gate_up

    x = torch.randn(700, 576, generator=_g()).bfloat16() * 3
    wp = ops.pack_vnni((torch.randn(2 * 336, 576, generator=_g(1)) * 0.05).bfloat16())
    wp = interleave_gate_up(wp) if swiglu else wp
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            outs.append(ops.linear_amx(x, wp, None, 288, swiglu))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.skipif(not getattr(ops, "has_avx512_bf16", False), reason="the SwiGLU epilogue needs AVX-512-BF16")
@pytest.mark.parametrize("m", [1, 5, 8, 13, 64, 300])
@pytest.mark.parametrize("k_chunk,lead", [(0, 0), (192, 0), (192, 3)])
@pytest.mark.parametrize("inter", [320, 336])
def test_linear_vnni_swiglu_epilogue_equals_silu_mul_of_the_projection(m: int, k_chunk: int, lead: int,
                                                                        inter: int) -> None:
    """With the gate/up weight interleaved, linear_vnni's SwiGLU epilogue gives silu(gate) * up bit for bit as
    silu_mul over the plain projection (same K chunks, lead rows included) - and that is transformers' F.silu(gate) *
    up of separate linears. Row counts cover every tile height (1-8 rows) and an odd number of (gate, up) pairs."""
    from tierserve.model_executor.models.llama import interleave_gate_up

    k = 576
    x = torch.randn(m, k, generator=_g()).bfloat16() * 3  # wide enough that silu meets large and negative inputs
    w = (torch.randn(2 * inter, k, generator=_g(1)) * 0.05).bfloat16()
    wp = ops.pack_vnni(w)
    out = ops.linear_vnni(x, interleave_gate_up(wp), None, k_chunk, lead, 0, True)
    assert out.shape == (m, inter)
    assert torch.equal(out, ops.silu_mul(ops.linear_vnni(x, wp, None, k_chunk, lead, 0)))
    if k_chunk == 0 and m <= 8:
        ref = torch.cat([F.silu(F.linear(x[i:i + 1], w[:inter])) * F.linear(x[i:i + 1], w[inter:]) for i in range(m)])
        close = (out.float() - ref.float()).abs() <= 1e-2 * ref.float().abs() + 1e-3
        assert close.all()  # K blocking aside (test_linear_vnni_with_torchs_k_blocking_is_bit_identical)
    with pytest.raises(RuntimeError, match="no bias"):
        ops.linear_vnni(x, interleave_gate_up(wp), torch.zeros(2 * inter).bfloat16(), 0, 0, 0, True)
    with pytest.raises(RuntimeError, match="pairs"):
        ops.linear_vnni(x, ops.pack_vnni(w[:48]), None, 0, 0, 0, True)


@pytest.mark.parametrize("m", [1, 4, 9, 64])
def test_linear_vnni_prefetch_changes_no_bits(m: int) -> None:
    """The software prefetch of each group's first row tile only moves weights into cache earlier: any distance,
    including one reaching past the end of the weight, gives the same outputs."""
    x = torch.randn(m, 576, generator=_g()).bfloat16()
    wp = ops.pack_vnni((torch.randn(960, 576, generator=_g(1)) * 0.05).bfloat16())
    before = ops.linear_prefetch()
    try:
        outs = []
        for d in (0, 1, 64, 100000):
            ops.set_linear_prefetch(d)
            outs.append(ops.linear_vnni(x, wp, None, 192, 1, 0))
        with pytest.raises(RuntimeError, match=">= 0"):
            ops.set_linear_prefetch(-1)
    finally:
        ops.set_linear_prefetch(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_vnni
@pytest.mark.parametrize("m", [9, 12, 16])
@pytest.mark.parametrize("k_chunk,lead,lead_chunk", [(0, 0, 0), (192, 3, 0), (64, 10, 128)])
def test_linear_vnni_wide_tiles_and_work_chunks_change_no_bits(m: int, k_chunk: int, lead: int,
                                                                lead_chunk: int) -> None:
    """9-16 rows take one pass of 16-row tiles per output block (set_linear_wide_rows) and larger work chunks
    (set_linear_chunk): the same sums in the same order as 8-row tiles over block pairs, one group at a time - with
    a bias, a last group of one block, lead rows, K chunks and the SwiGLU epilogue."""
    from tierserve.model_executor.models.llama import interleave_gate_up

    x = torch.randn(m, 576, generator=_g()).bfloat16() * 3
    w = (torch.randn(336, 576, generator=_g(1)) * 0.05).bfloat16()  # 21 blocks: the last group has one
    wp, bias = ops.pack_vnni(w), torch.randn(336, generator=_g(2)).bfloat16()
    gate_up = interleave_gate_up(ops.pack_vnni(w[:320]))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return (ops.linear_vnni(x, wp, bias, k_chunk, lead, lead_chunk),
                ops.linear_vnni(x, gate_up, None, k_chunk, lead, lead_chunk, True))

    wide, chunk = ops.linear_wide_rows(), ops.linear_chunk()
    try:
        outs = [run()]
        for rows, groups in ((0, 1), (0, 0), (16, 1), (16, 4), (16, 1000)):
            ops.set_linear_wide_rows(rows)
            ops.set_linear_chunk(groups)
            outs.append(run())
        with pytest.raises(RuntimeError, match=">= 0"):
            ops.set_linear_wide_rows(-1)
        with pytest.raises(RuntimeError, match=">= 0"):
            ops.set_linear_chunk(-1)
    finally:
        ops.set_linear_wide_rows(wide)
        ops.set_linear_chunk(chunk)
    assert all(torch.equal(outs[0][0], o[0]) and torch.equal(outs[0][1], o[1]) for o in outs[1:])
    assert torch.equal(outs[0][1], ops.silu_mul(ops.linear_vnni(x, ops.pack_vnni(w[:320]), None, k_chunk, lead,
                                                                lead_chunk)))


@needs_vnni
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("n", [336, 352, 368])  # 21, 22, 23 blocks: 4-block groups end with 1, 2 or 3 blocks
@pytest.mark.parametrize("k_chunk,lead,lead_chunk", [(0, 0, 0), (192, 1, 0), (64, 1, 128)])
def test_linear_vnni_four_block_groups_change_no_bits(m: int, n: int, k_chunk: int, lead: int,
                                                      lead_chunk: int) -> None:
    """Calls of 1-2 rows take 4 output blocks per group (set_linear_quad_rows), each block's chain of dot products
    in flight beside three others: the same sums as 2-block groups - with a bias, a last group of 1-3 blocks, a lead
    row, K chunks and the SwiGLU epilogue (two gate/up pairs per group); a 3-row call is unchanged."""
    from tierserve.model_executor.models.llama import interleave_gate_up

    x = torch.randn(m, 576, generator=_g()).bfloat16() * 3
    w = (torch.randn(n, 576, generator=_g(1)) * 0.05).bfloat16()
    wp, bias = ops.pack_vnni(w), torch.randn(n, generator=_g(2)).bfloat16()
    gate_up = interleave_gate_up(ops.pack_vnni(w[: n // 32 * 32]))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return (ops.linear_vnni(x, wp, bias, k_chunk, lead, lead_chunk),
                ops.linear_vnni(x, gate_up, None, k_chunk, lead, lead_chunk, True))

    quad = ops.linear_quad_rows()
    try:
        ops.set_linear_quad_rows(0)
        two = run()
        ops.set_linear_quad_rows(2)
        four = run()
        for bad in (-1, 9):
            with pytest.raises(RuntimeError, match=r"\[0, 8\]"):
                ops.set_linear_quad_rows(bad)
    finally:
        ops.set_linear_quad_rows(quad)
    assert torch.equal(two[0], four[0]) and torch.equal(two[1], four[1])
    xf = x.float()
    ref = xf @ w.float().T + bias.float()
    torch.testing.assert_close(four[0].float(), ref, atol=3e-2, rtol=1e-2)


def test_linear_vnni_k_chunk_arguments() -> None:
    """Chunked sums equal the portable reference order: chunks of K from zero, added in order."""
    x = torch.randn(5, 70, generator=_g()).bfloat16()
    w = (torch.randn(32, 70, generator=_g(1)) * 0.05).bfloat16()
    wp = ops.pack_vnni(w)
    xf, wf = x.float(), w.float()
    ref = (xf[:, :32] @ wf[:, :32].T + xf[:, 32:64] @ wf[:, 32:64].T + xf[:, 64:] @ wf[:, 64:].T)
    torch.testing.assert_close(ops.linear_vnni(x, wp, None, 32).float(), ref, atol=1e-2, rtol=8e-3)
    with pytest.raises(RuntimeError, match="even"):
        ops.linear_vnni(x, wp, None, 33)
    with pytest.raises(RuntimeError, match="lead_rows"):
        ops.linear_vnni(x, wp, None, 32, -1, 0)


def test_bad_shapes_raise() -> None:
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.pack_vnni(torch.zeros(20, 8).bfloat16())
    wp = ops.pack_vnni(torch.zeros(16, 8).bfloat16())
    with pytest.raises(RuntimeError, match="x has 9 features"):
        ops.linear_vnni(torch.zeros(2, 9).bfloat16(), wp)
    with pytest.raises(RuntimeError, match="bf16"):
        ops.linear_vnni(torch.zeros(2, 8), wp)
    with pytest.raises(RuntimeError, match="pack_vnni"):
        ops.linear_vnni(torch.zeros(2, 8).bfloat16(), torch.zeros(16, 8).bfloat16())
    with pytest.raises(RuntimeError, match="bias must have 16"):
        ops.linear_vnni(torch.zeros(2, 8).bfloat16(), wp, torch.zeros(3).bfloat16())
    with pytest.raises(RuntimeError, match="rms_norm"):
        ops.rms_norm(torch.zeros(2, 8), None, torch.zeros(9), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 5, 16, 17, 4099, 49152])
def test_argmax_rows_equals_torch_max_on_float32(dtype: torch.dtype, n: int) -> None:
    """The greedy sampler's argmax read from the logits in their own dtype: the index torch's max(dim=-1) gives on
    the float32 copy - the first of equal maxima, the first NaN where a row has one (in the vector part, in the tail,
    a whole row of NaN), index 0 for a row of -inf - for row lengths with and without a tail past 16."""
    x = torch.randn(37, n, generator=_g()).to(dtype)
    x[3, n // 2] = float("nan")
    x[4, :] = float("-inf")
    x[5, :] = 1.0
    if n > 3:
        x[6, 1] = x[6, n - 1] = 1e4  # a tie between the first and the last vector
        x[7, n - 2] = float("nan")  # a NaN in the tail only (n = 17, 4099)
        x[9, n - 1] = 1e4  # the maximum in the last column
    if n > 20:
        x[7, 0] = float("nan")  # and an earlier one in the vector part: that one
    x[8, :] = float("nan")
    got = ops.argmax_rows(x)
    assert got.dtype == torch.long
    assert torch.equal(got, x.float().max(dim=-1).indices)
    assert torch.equal(ops.argmax_rows(x[::2]), x[::2].float().max(dim=-1).indices)  # a non-contiguous view
    with pytest.raises(RuntimeError, match="vocab > 0"):
        ops.argmax_rows(torch.empty(2, 0, dtype=dtype))


@pytest.mark.parametrize("m", [0, 1, 2, 5, 6, 7, 13, 200, 400])
@pytest.mark.parametrize("n,k", [(960, 576), (48, 1535), (16, 3)])
def test_linear_f32_matches_float64_reference(m: int, n: int, k: int) -> None:
    """The float32 linear of CPUs without native bf16: within float32 rounding of the exact product, with and without
    bias; one row takes the two-block GEMV (an odd block count leaves one block alone), more rows the 6-row tiles
    (a remainder takes a smaller tile; over 192 rows x is walked in slabs)."""
    x = torch.randn(m, k, generator=_g())
    w = torch.randn(n, k, generator=_g(1)) * 0.05
    b = torch.randn(n, generator=_g(2))
    wp = ops.pack_f32(w)
    assert wp.shape == (n // 16, k, 16)
    for bias in (None, b):
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()
        out = ops.linear_f32(x, wp, bias)
        assert out.shape == (m, n) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_linear_f32_rows_and_threads_do_not_change_a_result() -> None:
    """Each output sums its k in order with one FMA per k, so a row's result is the same alone, in any batch, and
    with any number of threads (the engine's outputs do not depend on what else is batched with a request)."""
    x = torch.randn(37, 576, generator=_g())
    wp = ops.pack_f32(torch.randn(3072 + 16, 576, generator=_g(1)) * 0.05)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(ops.linear_f32(x, wp))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    for r in (0, 5, 36):
        assert torch.equal(ops.linear_f32(x[r:r + 1], wp)[0], outs[0][r])


def test_linear_f32_rejects_bad_arguments() -> None:
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.pack_f32(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="float32"):
        ops.pack_f32(torch.randn(16, 8).bfloat16())
    wp = ops.pack_f32(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_f32(torch.randn(2, 9), wp)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear_f32(torch.randn(2, 8), wp, torch.randn(31))
