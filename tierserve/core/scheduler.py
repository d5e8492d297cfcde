"""Scheduler: iteration-level (continuous) batching under a per-step token budget.

There is no prefill or decode phase: every request's ``num_computed_tokens`` catches up with its ``num_tokens``,
at most ``max_num_batched_tokens`` new tokens per step over the whole batch. A long prompt is therefore split across
steps (chunked prefill) and shares steps with decodes. Running requests are served first, in policy order; when the
KV cache is out of blocks the running request with the lowest priority (the newest, under FCFS) is preempted: its
blocks are freed and it goes back to the waiting queue to be recomputed later. Waiting requests are admitted only in
a step that preempted nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tierserve.config import SchedulerConfig
from tierserve.core.kv_cache_manager import KVCacheManager
from tierserve.core.policies import get_policy
from tierserve.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """True when this step computes the request's last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.policy = get_policy(config.policy)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)
        out.preempted.append(request)
        logger.debug("preempted %s (%d tokens) for lack of KV blocks", request.request_id, request.num_tokens)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=self.policy.key)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is RequestStatus.PREEMPTED:
                break  # req was the lowest-priority one left: nothing after it can run either
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            i += 1
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=self.policy.key)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, num_new):
                break
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
