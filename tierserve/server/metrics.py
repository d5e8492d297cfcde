"""Prometheus metrics served at ``GET /metrics`` (names ``tierserve:*``, like vLLM's ``vllm:*``).

Engine-wide values (queue lengths, KV cache, token and preemption totals) are read at scrape time from the
AsyncEngine's stats snapshot; per-request values (finish reasons, latencies) are recorded on the event loop when a
request ends. Each server owns its own registry, so several apps can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierserve.engine.llm_engine import EngineStats
from tierserve.outputs import RequestMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Gauges and counters computed from the engine's latest ``EngineStats`` at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = ["model_name"]
        values: list[tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str, float]] = [
            (GaugeMetricFamily, "tierserve:num_requests_running", "Sequences running in the engine.", s.num_running),
            (GaugeMetricFamily, "tierserve:num_requests_waiting",
             "Sequences waiting in the scheduler (including preempted ones).", s.num_waiting),
            (GaugeMetricFamily, "tierserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = 100%).",
             s.kv_cache_usage),
            (GaugeMetricFamily, "tierserve:num_free_kv_blocks", "KV cache blocks free.", s.num_free_blocks),
            (GaugeMetricFamily, "tierserve:num_kv_blocks", "KV cache blocks in total.", s.num_blocks),
            (CounterMetricFamily, "tierserve:num_preemptions", "Sequences preempted for lack of KV blocks.",
             s.num_preemptions),
            (CounterMetricFamily, "tierserve:prompt_tokens", "Prompt tokens computed (prefill).", s.prompt_tokens),
            (CounterMetricFamily, "tierserve:generation_tokens", "Tokens generated.", s.generation_tokens),
        ]
        for family, name, doc, value in values:
            metric = family(name, doc, labels=labels)
            metric.add_metric([self._model], value)
            yield metric


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name))
        self._success = Counter(
            "tierserve:request_success", "Completions finished, by finish reason (n=2 counts twice; abort = the "
            "client went away).", ["model_name", "finished_reason"], registry=self.registry)
        self._rejected = Counter(
            "tierserve:request_rejected", "Requests answered with an error, by HTTP status.",
            ["model_name", "status"], registry=self.registry)
        self._ttft = Histogram("tierserve:time_to_first_token_seconds", "Time from arrival to the first token.",
                               ["model_name"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self._tpot = Histogram("tierserve:time_per_output_token_seconds",
                               "Mean time between output tokens of a request (after the first).",
                               ["model_name"], buckets=_TPOT_BUCKETS, registry=self.registry)
        self._e2e = Histogram("tierserve:e2e_request_latency_seconds", "Time from arrival to the last token.",
                              ["model_name"], buckets=_E2E_BUCKETS, registry=self.registry)

    def request_finished(self, finish_reasons: list[str], metrics: RequestMetrics | None,
                         max_output_tokens: int) -> None:
        """Record one engine request: the finish reason of each of its completions and its latencies."""
        for reason in finish_reasons:
            self._success.labels(self.model_name, reason).inc()
        if metrics is None or metrics.first_token_time is None:
            return
        self._ttft.labels(self.model_name).observe(metrics.first_token_time - metrics.arrival_time)
        if metrics.finished_time is not None:
            self._e2e.labels(self.model_name).observe(metrics.finished_time - metrics.arrival_time)
            if max_output_tokens > 1:
                self._tpot.labels(self.model_name).observe(
                    (metrics.finished_time - metrics.first_token_time) / (max_output_tokens - 1))

    def request_aborted(self, num_completions: int) -> None:
        self._success.labels(self.model_name, "abort").inc(num_completions)

    def request_rejected(self, status: int) -> None:
        self._rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
