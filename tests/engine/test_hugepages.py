"""Weights and KV cache on transparent huge pages (tierserve.utils.hugepages)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

from tierserve.utils import hugepages
from tierserve.utils.hugepages import HUGE_PAGE, host_buffer, huge_page_bytes, move_to_arena, thp_mode


def test_host_buffer_is_zeroed_aligned_and_outlives_its_mapping_reference() -> None:
    buf = host_buffer(3 * HUGE_PAGE + 123)
    assert buf.numel() == 3 * HUGE_PAGE + 123 and buf.dtype == torch.uint8
    assert int(buf.count_nonzero()) == 0
    if thp_mode() in ("always", "madvise"):
        assert buf.data_ptr() % HUGE_PAGE == 0
    view = buf[HUGE_PAGE:HUGE_PAGE + 40].view(torch.int32)
    del buf
    gc.collect()
    view.fill_(7)  # the mapping is still alive through the view
    assert view.sum().item() == 70


def test_host_buffer_gets_huge_pages_where_the_os_offers_them() -> None:
    if thp_mode() not in ("always", "madvise") or huge_page_bytes() < 0:
        pytest.skip(f"transparent huge pages: {thp_mode()}")
    before = huge_page_bytes()
    buf = host_buffer(16 * HUGE_PAGE)
    buf.fill_(1)
    assert huge_page_bytes() - before >= 8 * HUGE_PAGE, "an advised, touched 32 MiB buffer got no huge pages"
    del buf


def test_populated_host_buffer_is_resident_before_first_use() -> None:
    """The KV cache is allocated populated, so no step pays the first-touch page faults."""
    if thp_mode() not in ("always", "madvise") or huge_page_bytes() < 0:
        pytest.skip(f"transparent huge pages: {thp_mode()}")
    before = huge_page_bytes()
    lazy = host_buffer(16 * HUGE_PAGE)
    assert huge_page_bytes() - before < 4 * HUGE_PAGE, "an untouched buffer was already resident"
    before = huge_page_bytes()
    eager = host_buffer(16 * HUGE_PAGE, populate=True)
    assert huge_page_bytes() - before >= 8 * HUGE_PAGE, "populate=True left the pages unfaulted"
    assert eager.count_nonzero().item() == 0 and eager.numel() == 16 * HUGE_PAGE
    del lazy, eager


def test_host_buffer_falls_back_to_ordinary_memory(monkeypatch: Any) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    buf = host_buffer(1000)
    assert buf.numel() == 1000 and int(buf.count_nonzero()) == 0
    assert host_buffer(0).numel() == 0


def test_move_to_arena_keeps_values_and_lays_tensors_out_in_order() -> None:
    torch.manual_seed(0)
    ts = [torch.randn(5, 7).bfloat16(), torch.randn(3), torch.randn(11, 2).bfloat16(), torch.arange(5)]
    params = [torch.nn.Parameter(t.clone(), requires_grad=False) for t in ts]
    arena = move_to_arena(params)
    ptrs = [p.data_ptr() for p in params]
    assert ptrs == sorted(ptrs) and all(p % 64 == 0 for p in ptrs)
    assert ptrs[0] == arena.data_ptr()
    for p, t in zip(params, ts):
        assert p.dtype == t.dtype and p.shape == t.shape and torch.equal(p, t)
    del arena
    gc.collect()
    assert torch.equal(params[1], ts[1])  # the tensors keep the arena alive


def test_engine_weights_and_kv_cache_live_in_huge_page_buffers(llm_fp32: Any) -> None:
    runner = llm_fp32.engine.runner
    # (projection weights released once every step reads packed copies - bf16 on AVX-512-BF16, float32 on AVX2 -
    # are empty and have no place in the arena)
    weights = [w for w in runner.model.weights_in_step_order() if w.numel()]
    ptrs = [w.data_ptr() for w in weights]
    assert ptrs == sorted(ptrs), "weights are not laid out in step order"
    span = ptrs[-1] + weights[-1].numel() * weights[-1].element_size() - ptrs[0]
    assert span < sum(w.numel() * w.element_size() for w in weights) + 64 * len(weights)
    caches = runner.kv_caches
    assert all(c.data_ptr() == caches[0].data_ptr() + i * caches[0].nbytes for i, c in enumerate(caches))
    if thp_mode() in ("always", "madvise"):
        assert ptrs[0] % HUGE_PAGE == 0 and caches[0].data_ptr() % HUGE_PAGE == 0
