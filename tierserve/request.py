"""Request: one sequence being generated, as the scheduler and engine see it.

Tokens, not phases: a request has ``num_tokens`` (prompt + generated so far) and ``num_computed_tokens`` (tokens
whose KV is in the cache). Prefill, chunked prefill, decode and recompute after preemption are all "compute the
tokens from num_computed_tokens up to num_tokens".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tierserve.core.block_pool import BlockId
from tierserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int]
    prompt: str | None = None
    priority: int = 0
    """Lower value = more important (vLLM's convention). Preemption picks the largest (priority, arrival)."""
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None
    index: int = 0
    """Index among the parent's ``n`` completions."""

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[BlockId] = field(default_factory=list)
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    cumulative_logprob: float = 0.0

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(self.sampling_params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
