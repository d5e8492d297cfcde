"""What the engine hands back: RequestOutput / CompletionOutput (shaped like vLLM's)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position: token id -> Logprob, the sampled token first, then the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    """"stop" (EOS, stop string or stop token), "length" (max_tokens or context), "abort", or None if running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the completion, None for EOS or length."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """Output of one request.

    ``LLMEngine.step`` returns these as *deltas*: each ``outputs[i]`` holds only the text, token ids and logprobs
    produced since the previous step for completion ``i`` (only completions that changed are present).
    ``LLM.generate`` returns them accumulated: the whole text of every completion.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    extra: dict[str, object] = field(default_factory=dict)
