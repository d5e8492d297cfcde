"""The Triton paged decode kernel (``--attention-backend triton``) against the torch backend's decode.

On a CUDA GPU it runs compiled; on a CPU where Triton is installed, under Triton's interpreter (``TRITON_INTERPRET``,
set here before Triton is imported). Without Triton the tests skip: it is an optional dependency, CUDA-only in use.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when triton is imported)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (an optional dependency: CUDA's paged decode kernel)")

DEVICE = "cuda" if CUDA else "cpu"


def _case(dtype: torch.dtype, lens: list[int], heads: int = 9, kv_heads: int = 3, d: int = 64, bs: int = 16,
          seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    width = max((n + bs - 1) // bs for n in lens) + 1  # one spare column: tables are padded
    num_blocks = b * width + 3
    cache = torch.randn(2, kv_heads, num_blocks, bs, d, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: b * width].view(b, width)  # scattered blocks
    q = torch.randn(b, heads, d, generator=gen).to(dtype)
    dev = torch.device(DEVICE)
    return (q.to(dev), cache.to(dev), tables.to(dev), torch.tensor(lens, dtype=torch.long, device=dev))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lens", [[1], [16], [17, 5, 40], [33, 1, 64, 100, 3]])
def test_paged_decode_matches_torch_backend(dtype: torch.dtype, atol: float, lens: list[int]) -> None:
    from tierserve.model_executor.attention.base import AttentionMetadata
    from tierserve.model_executor.attention.torch_backend import TorchAttentionBackend
    from tierserve.model_executor.attention.triton_backend import paged_decode

    q, cache, tables, seq_lens = _case(dtype, lens)
    ref_backend = TorchAttentionBackend(9, 3, 64, 16)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(lens),
                             decode_block_tables=tables, decode_seq_lens=seq_lens, prefill_query_lens=[],
                             prefill_seq_lens=[], prefill_block_tables=torch.empty(0),
                             prefill_query_start=torch.zeros(1, dtype=torch.long))
    ref = ref_backend._decode(q, cache[0], cache[1], meta)
    got = paged_decode(q, cache[0], cache[1], tables, seq_lens, ref_backend.scale)
    assert got.shape == ref.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)


def test_group_not_a_power_of_two_and_one_kv_head() -> None:
    """5 query heads on 1 kv head (the group padded to 8 inside the kernel; the padded heads are not written)."""
    from tierserve.model_executor.attention.triton_backend import paged_decode

    q, cache, tables, seq_lens = _case(torch.float32, [20, 7], heads=5, kv_heads=1)
    got = paged_decode(q, cache[0], cache[1], tables, seq_lens, 0.125)
    for i, n in enumerate(seq_lens.tolist()):  # the plain formula, per sequence
        keys = cache[0, 0, tables[i]].reshape(-1, 64)[:n]
        vals = cache[1, 0, tables[i]].reshape(-1, 64)[:n]
        p = (q[i] @ keys.T * 0.125).softmax(-1)
        torch.testing.assert_close(got[i].view(5, 64), p @ vals, atol=2e-5, rtol=0)


def test_backend_refuses_what_it_cannot_run() -> None:
    from tierserve.model_executor.attention.triton_backend import TritonAttentionBackend

    with pytest.raises(ValueError, match="power-of-two"):
        TritonAttentionBackend(9, 3, 48, 16)
