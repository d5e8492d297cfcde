"""Scheduling policies: small objects that order requests. The scheduler's mechanism is shared.

A policy's ``key`` sorts requests most-important first: the scheduler admits waiting requests in that order and,
when KV blocks run out, preempts the running request with the largest key.
"""

from __future__ import annotations

from typing import Protocol

from tierserve.request import Request


class SchedulingPolicy(Protocol):
    name: str

    def key(self, request: Request) -> tuple[float, ...]: ...


class FCFSPolicy:
    """First come, first served: the newest request is preempted first."""

    name = "fcfs"

    def key(self, request: Request) -> tuple[float, ...]:
        return (request.arrival_time,)


class PriorityPolicy:
    """Lower ``Request.priority`` first (vLLM's convention), then arrival."""

    name = "priority"

    def key(self, request: Request) -> tuple[float, ...]:
        return (float(request.priority), request.arrival_time)


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}


def get_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; available: {', '.join(POLICIES)}") from None
