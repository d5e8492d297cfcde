"""Scheduler without a model: token budget, chunking, preemption order, no deadlock."""

from __future__ import annotations

import random

from tierserve.config import SchedulerConfig
from tierserve.core.kv_cache_manager import KVCacheManager
from tierserve.core.scheduler import Scheduler
from tierserve.request import Request, RequestStatus
from tierserve.sampling_params import SamplingParams


def _req(i: int, n: int, max_tokens: int = 4) -> Request:
    return Request(f"r{i}", [1] * n, SamplingParams(max_tokens=max_tokens), max_tokens, frozenset(),
                   arrival_time=float(i))


def _simulate(sched: Scheduler, reqs: list[Request], max_steps: int = 10_000) -> int:
    """Run scheduling with a fake model that 'samples' token 7; returns the number of steps."""
    for r in reqs:
        sched.add(r)
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        for s in out.scheduled:
            done = s.completes
            s.request.num_computed_tokens += s.num_new_tokens
            if done:
                s.request.append_token(7)
                if s.request.num_output_tokens >= s.request.max_tokens:
                    sched.finish(s.request, RequestStatus.FINISHED_LENGTH)
        sched.kv.pool.check_integrity()
    return steps


def test_long_prompt_is_chunked_under_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), KVCacheManager(100, 16))
    req = _req(0, 100)
    sched.add(req)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [32] and not out.scheduled[0].completes


def test_decodes_share_steps_with_prefill_chunks() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=20), KVCacheManager(100, 16))
    a, b = _req(0, 4, max_tokens=50), _req(1, 60)
    sched.add(a)
    out = sched.schedule()
    a.num_computed_tokens += 4
    a.append_token(7)
    sched.add(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 19)]


def test_preempts_newest_and_finishes_everything() -> None:
    rng = random.Random(1)
    reqs = [_req(i, rng.randint(5, 120), max_tokens=rng.randint(1, 40)) for i in range(40)]
    kv = KVCacheManager(num_blocks=12, block_size=16)  # 192 tokens: far less than the batch needs
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16), kv)
    _simulate(sched, reqs)
    assert sched.num_preemptions > 0
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert kv.pool.num_free_blocks == 12


def test_priority_policy_admits_important_first() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, policy="priority"), KVCacheManager(100, 16))
    low, high = _req(0, 8), _req(1, 8)
    low.priority, high.priority = 5, 0
    sched.add(low)
    sched.add(high)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r1"]
