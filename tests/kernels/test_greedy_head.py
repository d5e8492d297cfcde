"""greedy_head: the LM head's greedy tokens through an int8 screen must be exactly argmax_rows(linear_vnni(...)) -
the first of equal maxima, a NaN counting as the maximum - on every input, not an approximation of it."""

from __future__ import annotations

import pytest
import torch

from tierserve.kernels import cpu_ops
from tierserve.model_executor.models.llama import screen_weights

ops = cpu_ops()
pytestmark = [
    pytest.mark.skipif(ops is None, reason="native kernels unavailable"),
    # The screen is int8 x int8 VNNI and its exact rescoring bf16 dot products: built only where the CPU has both
    # (an AVX2-only CPU such as a Zen 3 computes in float32 and the engine never asks for greedy_head there: llama.py).
    pytest.mark.skipif(ops is not None and not getattr(ops, "has_screen", False),
                       reason="greedy_head needs AVX-512-BF16 + AVX-512 VNNI, which this CPU lacks"),
]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both(x: torch.Tensor, w: torch.Tensor, k_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    assert ops is not None
    wp = ops.pack_vnni(w)
    full = ops.argmax_rows(ops.linear_vnni(x, wp, None, 0, x.shape[0], k_chunk))
    return full, ops.greedy_head(x, wp, *screen_weights(w), k_chunk)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(1024, 576), (80, 575), (4096, 64)])  # 80: a last group of one block; odd K
@pytest.mark.parametrize("k_chunk", [0, 64])
def test_greedy_head_equals_argmax_of_the_head(m: int, n: int, k: int, k_chunk: int) -> None:
    """Peaked rows (one output far ahead, as a trained model's are), flat rows (many near-equal logits), a zero
    row; different row scales; K chunks; a last partial group; odd K."""
    w = (torch.randn(n, k, generator=_g(1)) * 0.05).bfloat16()
    rows = []
    for i in range(m):
        kind = i % 4
        if kind == 0:  # peaked: aligned with one weight row
            rows.append(w[(37 * i + 5) % n].float() * 40 + torch.randn(k, generator=_g(10 + i)) * 0.5)
        elif kind == 1:
            rows.append(torch.randn(k, generator=_g(10 + i)) * 3)
        elif kind == 2:
            rows.append(torch.zeros(k))
        else:
            rows.append(torch.randn(k, generator=_g(10 + i)) * 1e-3)
    x = torch.stack(rows).bfloat16()
    full, got = _both(x, w, k_chunk)
    assert torch.equal(full, got)


def test_greedy_head_ties_take_the_first_index() -> None:
    """Equal weight rows give equal logits: the first of them wins, as argmax_rows (and torch) decide."""
    w = (torch.randn(512, 96, generator=_g(2)) * 0.05).bfloat16()
    for j in (300, 17, 450):
        w[j] = w[200]
    x = (w[200].float() * 30).bfloat16()[None].repeat(3, 1)
    x[1] = -x[1]
    full, got = _both(x, w, 0)
    assert torch.equal(full, got)
    assert int(got[0]) == 17  # rows 17, 200, 300, 450 tie at the maximum


def test_greedy_head_nonfinite_and_extreme_inputs() -> None:
    """A NaN or an infinity in a row (the screen's bound is not finite: every block is computed), values near
    bf16's largest and smallest: still exactly the full argmax."""
    w = (torch.randn(256, 128, generator=_g(3)) * 0.05).bfloat16()
    x = torch.randn(5, 128, generator=_g(4)).bfloat16()
    x[0, 7] = float("nan")
    x[1, 3] = float("inf")
    x[2] = x[2] * 1e30
    x[3] = x[3] * 1e-30
    x[4, 0] = -float("inf")
    full, got = _both(x, w, 0)
    assert torch.equal(full, got)


def test_greedy_head_at_the_default_models_head_shape() -> None:
    """A head of the default model's shape (49152 x 576, its one-row K chunk of 512): same tokens."""
    w = (torch.randn(49152, 576, generator=_g(5)) * 0.04).bfloat16()
    x = torch.stack([w[t].float() * 25 + torch.randn(576, generator=_g(t)) for t in (11, 4000, 49151, 30000)])
    full, got = _both(x.bfloat16(), w, 512)
    assert torch.equal(full, got)


def test_greedy_head_checks_its_arguments() -> None:
    assert ops is not None
    w = (torch.randn(64, 32, generator=_g(6)) * 0.05).bfloat16()
    wp, screen = ops.pack_vnni(w), screen_weights(w)
    x = torch.randn(2, 32).bfloat16()
    with pytest.raises(RuntimeError, match="screen_weights"):
        ops.greedy_head(x, wp, screen[0][:, :8].contiguous(), *screen[1:], 0)
    with pytest.raises(RuntimeError, match="features"):
        ops.greedy_head(torch.randn(2, 30).bfloat16(), wp, *screen, 0)
    with pytest.raises(RuntimeError, match="even"):
        ops.greedy_head(x, wp, *screen, 3)
    assert ops.greedy_head(x[:0], wp, *screen, 0).shape == (0,)
