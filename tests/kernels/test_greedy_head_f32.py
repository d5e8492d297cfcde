"""greedy_head_f32: float32 greedy tokens of the LM head through the int8 screen (AVX2) must be exactly
argmax_rows(linear_f32(...)) - the first of equal maxima, a NaN counting as the maximum - on every input."""

from __future__ import annotations

import pytest
import torch

from tierserve.kernels import cpu_ops
from tierserve.model_executor.models.llama import screen_weights

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None or not getattr(ops, "has_avx2_fma", False),
                                reason="linear_f32 and its screen need the native kernels built with AVX2 + FMA")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert ops is not None
    wp = ops.pack_f32(w)
    full = ops.argmax_rows(ops.linear_f32(x, wp))
    return full, ops.greedy_head_f32(x, wp, *screen_weights(w))


def _rows(w: torch.Tensor, m: int) -> torch.Tensor:
    n, k = w.shape
    rows = []
    for i in range(m):
        kind = i % 5
        if kind == 0:  # peaked: aligned with one weight row, as a trained model's hidden states are
            rows.append(w[(37 * i + 5) % n] * 40 + torch.randn(k, generator=_g(10 + i)) * 0.5)
        elif kind == 1:
            rows.append(torch.randn(k, generator=_g(10 + i)) * 3)
        elif kind == 2:
            rows.append(torch.zeros(k))
        elif kind == 3:
            rows.append(torch.randn(k, generator=_g(10 + i)) * 1e-3)
        else:  # one large outlier feature, as RMSNorm outputs have
            r = torch.randn(k, generator=_g(10 + i))
            r[i % k] = 200.0
            rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 64])  # row tiles of 4: whole, partial, several
@pytest.mark.parametrize("n,k", [(1024, 576), (80, 575), (4096, 64), (48, 7)])  # partial last group; odd K
def test_greedy_head_f32_equals_argmax_of_the_head(m: int, n: int, k: int) -> None:
    w = torch.randn(n, k, generator=_g(1)) * 0.05
    full, got = _both(_rows(w, m), w)
    assert torch.equal(full, got)


def test_greedy_head_f32_ties_take_the_first_index() -> None:
    """Equal weight rows give equal logits: the first of them wins, as argmax_rows (and torch) decide."""
    w = torch.randn(512, 96, generator=_g(2)) * 0.05
    for j in (300, 17, 450):
        w[j] = w[200]
    x = (w[200] * 30)[None].repeat(3, 1)
    x[1] = -x[1]
    full, got = _both(x, w)
    assert torch.equal(full, got)
    assert int(got[0]) == 17  # rows 17, 200, 300, 450 tie at the maximum


def test_greedy_head_f32_near_ties_are_exact() -> None:
    """Logits closer together than the screen can tell apart (weight rows differing in their last bits): every
    candidate is computed exactly, so the token is still the float32 argmax."""
    w = torch.randn(256, 64, generator=_g(7)) * 0.05
    base = w[100].clone()
    for j, eps in ((5, 1e-7), (150, -1e-7), (255, 2e-7)):
        w[j] = base + eps * torch.randn(64, generator=_g(j))
    x = torch.stack([base * 50, base * 50 + torch.randn(64, generator=_g(8)) * 1e-4, -base * 50])
    full, got = _both(x, w)
    assert torch.equal(full, got)


def test_greedy_head_f32_nonfinite_and_extreme_inputs() -> None:
    """A NaN or an infinity in a row (the screen declines it: every block is computed), huge and tiny rows."""
    w = torch.randn(256, 128, generator=_g(3)) * 0.05
    x = torch.randn(6, 128, generator=_g(4))
    x[0, 7] = float("nan")
    x[1, 3] = float("inf")
    x[2] = x[2] * 1e30
    x[3] = x[3] * 1e-30
    x[4, 0] = -float("inf")
    x[5] = x[5] * 1e36  # logits overflow to infinities
    full, got = _both(x, w)
    assert torch.equal(full, got)


def test_greedy_head_f32_at_the_default_models_head_shape() -> None:
    """A head of the default model's shape (49152 x 576): same tokens for a decode step's 64 rows."""
    w = torch.randn(49152, 576, generator=_g(5)) * 0.04
    ts = [(37 * i * i + 11) % 49152 for i in range(64)]
    x = torch.stack([w[t] * 25 + torch.randn(576, generator=_g(t)) for t in ts])
    full, got = _both(x, w)
    assert torch.equal(full, got)
    assert got.tolist() == ts


def test_greedy_head_f32_checks_its_arguments() -> None:
    assert ops is not None
    w = torch.randn(64, 32, generator=_g(6)) * 0.05
    wp, screen = ops.pack_f32(w), screen_weights(w)
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="screen_weights"):
        ops.greedy_head_f32(x, wp, screen[0][:, :8].contiguous(), *screen[1:])
    with pytest.raises(RuntimeError, match="features"):
        ops.greedy_head_f32(torch.randn(2, 30), wp, *screen)
    with pytest.raises(RuntimeError, match="float32"):
        ops.greedy_head_f32(x.bfloat16(), wp, *screen)
    assert ops.greedy_head_f32(x[:0], wp, *screen).shape == (0,)
