"""The native fused ops against the torch code they replace (the unfused model path, which follows transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops
from tierserve.model_executor.models.llama import rms_norm
from tierserve.model_executor.models.rope import apply_rope

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="native kernels cannot be built here")
DTYPES = [torch.float32, torch.bfloat16]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm_matches_torch(dtype: torch.dtype, with_delta: bool) -> None:
    x = torch.randn(7, 576, generator=_g()).to(dtype)
    d = torch.randn(7, 576, generator=_g(1)).to(dtype) if with_delta else None
    w = torch.randn(576, generator=_g(2)).to(dtype)
    ref_x = x + d if d is not None else x.clone()
    ref = rms_norm(ref_x, w, 1e-5)
    out = ops.rms_norm(x, d, w, 1e-5)
    torch.testing.assert_close(x, ref_x, atol=0, rtol=0)  # the residual add happened in place, same rounding
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: at most one rounding step apart
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if dtype == torch.bfloat16:
        assert (out == ref).float().mean() > 0.99


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    gu = torch.randn(6, 2 * 1536, generator=_g()).to(dtype) * 4
    g, u = gu.split([1536, 1536], dim=-1)
    ref = F.silu(g) * u
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ops.silu_mul(gu).float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("m", [0, 1, 3, 4, 9])
@pytest.mark.parametrize("n,k", [(960, 576), (100, 70), (33, 1536)])
def test_linear_small_matches_fp32_reference(m: int, n: int, k: int) -> None:
    """bf16 in/out, fp32 accumulation: within one bf16 rounding of the exact product; K not a multiple of 32 and N
    not a multiple of the row tile take the masked tails."""
    x = torch.randn(m, k, generator=_g()).bfloat16()
    w = (torch.randn(n, k, generator=_g(1)) * 0.05).bfloat16()
    b = torch.randn(n, generator=_g(2)).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    out = ops.linear_small(x, w, b)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(ops.linear_small(x, w).float(), F.linear(x.float(), w.float()), atol=1e-2, rtol=8e-3)


def test_bad_shapes_raise() -> None:
    with pytest.raises(RuntimeError, match="linear_small"):
        ops.linear_small(torch.zeros(2, 8).bfloat16(), torch.zeros(4, 9).bfloat16())
    with pytest.raises(RuntimeError, match="bf16 only"):
        ops.linear_small(torch.zeros(2, 8), torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="rms_norm"):
        ops.rms_norm(torch.zeros(2, 8), None, torch.zeros(9), 1e-5)
