"""SamplingParams: how to pick tokens for one request (shaped like vLLM's)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tierserve.errors import InvalidSamplingParamsError

_GREEDY_EPS = 1e-5


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSamplingParamsError(f"{name} must be a number, got {value!r}", param=name)
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise InvalidSamplingParamsError(f"{name} must be finite, got {value!r}", param=name)
    return v


@dataclass
class SamplingParams:
    """Sampling parameters for one request.

    temperature 0 means greedy. ``top_k`` 0 or -1 disables top-k. ``seed`` makes the request's random draws
    reproducible whatever else shares its batch (its own generator; the text also depends on the logits, whose last
    bits can change if the request is preempted and recomputed or prefilled in other chunks).
    ``logprobs`` = N returns the sampled token's log-probability plus the
    N most likely alternatives at each step (computed from the raw model distribution, as vLLM does).
    ``max_tokens`` None means "up to the context length".
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        """Raise InvalidSamplingParamsError naming the field, its value and the allowed range."""
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise InvalidSamplingParamsError(f"n must be an integer >= 1, got {self.n!r}", param="n")
        t = _check_number("temperature", self.temperature)
        if t < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0, got {t}", param="temperature")
        p = _check_number("top_p", self.top_p)
        if not 0 < p <= 1:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {p}", param="top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise InvalidSamplingParamsError(
                f"top_k must be an integer, -1 or 0 (disabled) or >= 1, got {self.top_k!r}", param="top_k"
            )
        mp = _check_number("min_p", self.min_p)
        if not 0 <= mp <= 1:
            raise InvalidSamplingParamsError(f"min_p must be in [0, 1], got {mp}", param="min_p")
        rp = _check_number("repetition_penalty", self.repetition_penalty)
        if rp <= 0:
            raise InvalidSamplingParamsError(
                f"repetition_penalty must be > 0, got {rp}", param="repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = _check_number(name, getattr(self, name))
            if not -2 <= v <= 2:
                raise InvalidSamplingParamsError(f"{name} must be in [-2, 2], got {v}", param=name)
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise InvalidSamplingParamsError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", param="max_tokens"
            )
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InvalidSamplingParamsError(
                f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", param="min_tokens"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidSamplingParamsError(f"seed must be an integer, got {self.seed!r}", param="seed")
        if self.seed is not None and not (-(2**63) <= self.seed and self.seed + self.n - 1 < 2**63):
            # choice i of n draws with seed + i; torch's generators take 64-bit seeds
            raise InvalidSamplingParamsError(
                f"seed must be in [-2^63, 2^63 - n] (a signed 64-bit integer for each of the n choices), got "
                f"{self.seed}", param="seed")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", param="min_tokens")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 20
        ):
            raise InvalidSamplingParamsError(
                f"logprobs must be an integer in [0, 20], got {self.logprobs!r}", param="logprobs"
            )
        assert isinstance(self.stop, list)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidSamplingParamsError(f"stop strings must be non-empty strings, got {s!r}", param="stop")
        for tid in self.stop_token_ids or []:
            if not isinstance(tid, int) or tid < 0:
                raise InvalidSamplingParamsError(
                    f"stop_token_ids must be non-negative integers, got {tid!r}", param="stop_token_ids"
                )
