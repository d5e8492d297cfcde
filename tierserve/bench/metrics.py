"""Serving metrics, defined exactly as vLLM's `vllm bench serve` (benchmarks/serve.py, ``calculate_metrics``).

Per request (times in seconds, from ``send_time``, the moment the HTTP request is sent):
- TTFT: arrival of the first chunk that carries content − send time.
- ITL: every gap between two consecutive content chunks (one entry per gap; a chunk may hold several tokens).
- E2E: arrival of the last chunk that carries a choice − send time.
- TPOT: (E2E − TTFT) / (output_tokens − 1), defined only when output_tokens > 1.

Over a run of ``duration_s`` seconds (first send → last response):
- request throughput = completed / duration; output throughput = Σ output tokens / duration;
  total-token throughput = (Σ prompt tokens + Σ output tokens) / duration, over completed requests only.
- mean / median / p90 / p99 with numpy's linear-interpolation percentiles, reported in milliseconds;
  TPOT statistics use only requests with more than one output token, ITL statistics pool every gap.
- goodput (DistServe, OSDI'24): completed requests per second that meet *every* SLO given
  (``ttft``, ``tpot``, ``e2e``, in ms; a request meets an SLO when its value ≤ the SLO). A request with one output
  token counts TPOT = 0 here, as vLLM does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = {"median": 50.0, "p90": 90.0, "p99": 99.0}
SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


@dataclass
class RequestRecord:
    """What the client measured for one request. Times are seconds; ``None`` where not measured."""

    prompt_tokens: int
    send_time: float = 0.0
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    success: bool = False
    error: str | None = None
    error_detail: str | None = None
    generated_text: str = ""
    conversation_id: int = 0
    turn: int = 0

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.e2e is None or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens, "send_time": self.send_time,
            "ttft": self.ttft, "itl": self.itl, "tpot": self.tpot, "e2e": self.e2e, "success": self.success,
            "error": self.error, "error_detail": self.error_detail,
            "conversation_id": self.conversation_id, "turn": self.turn,
        }


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft=500,tpot=50"`` → ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds). Keys: ttft, tpot, e2e."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        name = SLO_KEYS.get(key.strip().lower())
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name is None or ms <= 0:
            raise ValueError(f"bad --slo item {part!r}: expected ttft=MS, tpot=MS or e2e=MS with MS > 0, "
                             "e.g. --slo ttft=500,tpot=50")
        slo[name] = ms
    return slo


def stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 of seconds, in milliseconds; all ``None`` for an empty list."""
    if not values_s:
        return {"mean": None, **dict.fromkeys(PERCENTILES)}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for name, q in PERCENTILES.items():
        out[name] = float(np.percentile(arr, q))
    return out


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO (ms); TPOT of a one-token answer counts as 0."""
    values = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2e": rec.e2e}
    return all(values[k] is not None and values[k] * 1000.0 <= limit for k, limit in slo.items())  # type: ignore[operator]


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``summary`` block of a result: counts, throughputs, latency statistics and goodput."""
    done = [r for r in records if r.success]
    failures = Counter(r.error or "unknown" for r in records if not r.success)
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    dur = duration_s if duration_s > 0 else float("nan")
    goodput = None
    if slo:
        goodput = sum(meets_slo(r, slo) for r in done) / dur if done else 0.0
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "failures": dict(sorted(failures.items())),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / dur if done else 0.0,
        "output_throughput": total_out / dur if done else 0.0,
        "total_token_throughput": (total_in + total_out) / dur if done else 0.0,
        "ttft_ms": stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": stats_ms([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([g for r in done for g in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in done if r.e2e is not None]),
        "goodput": goodput,
    }
