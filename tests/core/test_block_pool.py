"""BlockPool and KVCacheManager against a brute-force model of ref counts."""

from __future__ import annotations

import random

import pytest

from tierserve.core.block_pool import BlockId, BlockPool
from tierserve.core.kv_cache_manager import KVCacheManager
from tierserve.errors import TierserveError
from tierserve.request import Request
from tierserve.sampling_params import SamplingParams


def test_random_alloc_free_keeps_invariants() -> None:
    rng = random.Random(0)
    pool = BlockPool(64)
    held: list[list[BlockId]] = []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or pool.num_free_blocks == 0):
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, max(1, min(8, pool.num_free_blocks)))
            if n <= pool.num_free_blocks:
                held.append(pool.allocate(n))
        pool.check_integrity()
        in_use = sum(len(h) for h in held)
        assert pool.num_free_blocks == 64 - in_use
        assert len({b for h in held for b in h}) == in_use  # no block handed out twice


def test_double_free_and_overdraw_raise() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(TierserveError, match="freed twice"):
        pool.free(ids)
    with pytest.raises(TierserveError, match="only 4 free"):
        pool.allocate(5)


def test_allocate_slots_grows_block_table() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = Request("r", list(range(9)), SamplingParams(), 8, frozenset())
    assert kv.allocate_slots(req, 9) and len(req.block_ids) == 3  # tokens 0..8 -> 3 blocks
    req.num_computed_tokens = 9
    assert kv.allocate_slots(req, 3) and len(req.block_ids) == 3  # 12 tokens still fit 3 blocks
    assert kv.allocate_slots(req, 4) and len(req.block_ids) == 4
    assert not kv.allocate_slots(req, 100)  # short: nothing changes
    assert len(req.block_ids) == 4
    kv.free(req)
    assert req.block_ids == [] and kv.pool.num_free_blocks == 10
    assert kv.can_ever_fit(40) and not kv.can_ever_fit(41)
