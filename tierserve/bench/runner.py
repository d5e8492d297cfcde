"""One benchmark run: build the workload, pace the sessions, stream every request, summarize.

Python API (``bench compare`` calls it in-process)::

    result = await run_benchmark(BenchConfig(base_url="http://127.0.0.1:8000", num_requests=64))
    json.dump(result.to_json(), f)

``run_benchmark`` never raises for server faults (they are failures by kind); it raises ``ValueError`` /
``WorkloadFileError`` for a bad configuration or data file before sending anything. Setting ``stop`` (an
``asyncio.Event``) ends the run early: requests in flight count as ``interrupted`` and the partial result returns.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
from tqdm.auto import tqdm

from tierserve.bench.arrivals import gamma_arrivals, trace_arrivals
from tierserve.bench.client import (
    build_payload,
    fetch_model_id,
    is_chat,
    prefix_cache_hit_rate,
    scrape_prefix_cache,
    send_request,
)
from tierserve.bench.metrics import RequestRecord, summarize
from tierserve.bench.sources import count_tokens, load_tokenizer
from tierserve.bench.workloads import Session, Workload, WorkloadConfig, build_workload

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """Everything one run depends on; ``request_rate`` inf = no pacing (closed loop at ``max_concurrency``)."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    num_requests: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    use_trace_timestamps: bool = True
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    request_timeout: float = 300.0
    num_warmups: int = 1
    slo: dict[str, float] = field(default_factory=dict)
    disable_tqdm: bool = False
    label: str | None = None

    api_key: str | None = None
    """Sent as ``Authorization: Bearer <key>`` (a server started with an API key); never written to results."""

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/").removesuffix("/v1")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if math.isnan(self.request_rate):
            raise ValueError("--request-rate must be a number or inf, got nan")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["workload_args"] = d.pop("workload")
        d["workload"] = self.workload.name
        d["api_key"] = "(set)" if self.api_key else None
        d["request_rate"] = None if math.isinf(self.request_rate) else self.request_rate
        return d


@dataclass
class BenchResult:
    """Records of one run plus what is needed to summarize them (``to_json`` gives the result-file schema)."""

    config: BenchConfig
    records: list[RequestRecord]
    duration_s: float
    started_at: str
    model: str
    workload_info: dict[str, Any] = field(default_factory=dict)
    prefix_cache_hit_rate: float | None = None
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        s = summarize(self.records, self.duration_s, self.config.slo)
        s["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        s["interrupted"] = self.interrupted
        return s

    def to_json(self) -> dict[str, Any]:
        cfg = self.config.to_json()
        cfg.update(model=self.model, started_at=self.started_at, workload_info=self.workload_info,
                   time_unit_requests="s")
        return {"config": cfg, "summary": self.summary(),
                "requests": [r.to_json() for r in sorted(self.records, key=lambda r: r.send_time)]}


def render_prompt(session: Session, turn_index: int, answers: list[str], chat: bool) -> str | list[dict[str, str]]:
    """The prompt of turn ``turn_index``: single turns as is; conversations with earlier turns and answers."""
    turns = session.turns
    if len(turns) == 1:
        return turns[0].text
    if chat:
        msgs = []
        for t, a in zip(turns[:turn_index], answers, strict=True):
            msgs += [{"role": "user", "content": t.text}, {"role": "assistant", "content": a}]
        return [*msgs, {"role": "user", "content": turns[turn_index].text}]
    # The answer keeps its own leading space, so this turn's prompt + answer is exactly a prefix of the next one.
    history = "".join(f"User: {t.text}\n\nAssistant:{a}\n\n" for t, a in zip(turns[:turn_index], answers, strict=True))
    return f"{history}User: {turns[turn_index].text}\n\nAssistant:"


class _Run:
    """State of one run shared by its session tasks."""

    def __init__(self, cfg: BenchConfig, client: httpx.AsyncClient, model: str, t0: float) -> None:
        self.cfg, self.client, self.model, self.t0 = cfg, client, model, t0
        self.url = cfg.base_url + cfg.endpoint
        self.tok = load_tokenizer(cfg.workload.tokenizer)
        self.sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.records: list[RequestRecord] = []
        self.skipped_turns = 0
        self.bar: Any = None

    def count(self, text: str) -> int:
        return count_tokens(self.tok, text)

    async def send(self, session: Session, conv_id: int, turn_index: int, answers: list[str]) -> RequestRecord:
        turn = session.turns[turn_index]
        prompt = render_prompt(session, turn_index, answers, is_chat(self.cfg.endpoint))
        n_prompt = turn.prompt_tokens if isinstance(prompt, str) and len(session.turns) == 1 else (
            self.count(prompt) if isinstance(prompt, str) else sum(self.count(m["content"]) for m in prompt))
        rec = RequestRecord(prompt_tokens=n_prompt, conversation_id=conv_id, turn=turn_index)
        payload = build_payload(self.cfg.endpoint, self.model, prompt, turn.max_tokens, self.cfg.temperature,
                                self.cfg.ignore_eos)
        try:
            if self.sem is None:
                await send_request(self.client, self.url, payload, rec, self.t0, self.cfg.request_timeout, self.count)
            else:
                async with self.sem:
                    await send_request(self.client, self.url, payload, rec, self.t0, self.cfg.request_timeout,
                                       self.count)
        finally:
            if rec.success or rec.error:  # else cancelled before it was sent: not a request
                self.records.append(rec)
                if self.bar is not None:
                    self.bar.update(1)
        return rec

    async def session(self, session: Session, conv_id: int, arrival: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + arrival - time.perf_counter()))
        answers: list[str] = []
        used = 0
        limit = self.cfg.workload.max_context_tokens
        for k, turn in enumerate(session.turns):
            if k > 0 and limit is not None and used + turn.prompt_tokens + turn.max_tokens + 16 > limit:
                self.skipped_turns += len(session.turns) - k
                return
            rec = await self.send(session, conv_id, k, answers)
            if not rec.success:
                for j in range(k + 1, len(session.turns)):
                    self.records.append(RequestRecord(0, rec.send_time, conversation_id=conv_id, turn=j,
                                                      error="conversation_aborted"))
                return
            answers.append(rec.generated_text)
            used = rec.prompt_tokens + rec.output_tokens


def arrival_times(cfg: BenchConfig, workload: Workload) -> list[float]:
    n = len(workload.sessions)
    if workload.timestamps_s is not None and cfg.use_trace_timestamps:
        if not math.isinf(cfg.request_rate):
            raise ValueError("a trace replays its own timestamps; drop --request-rate or pass --no-trace-timestamps")
        return trace_arrivals(workload.timestamps_s, cfg.workload.trace_time_scale)
    return gamma_arrivals(n, cfg.request_rate, cfg.burstiness, cfg.seed)


async def run_benchmark(cfg: BenchConfig, workload: Workload | None = None,
                        stop: asyncio.Event | None = None) -> BenchResult:
    """Run one benchmark point; pass ``workload`` to reuse one across a sweep (it must come from ``cfg``)."""
    if workload is None:
        workload = build_workload(cfg.workload, cfg.num_requests, cfg.seed)
    arrivals = arrival_times(cfg, workload)
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    timeout = httpx.Timeout(cfg.request_timeout)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, headers=headers) as client:
        model = cfg.model or await fetch_model_id(client, cfg.base_url) or cfg.workload.tokenizer
        warm = _Run(cfg, client, model, time.perf_counter())
        await _wait([asyncio.create_task(_warm_up(warm, workload.sessions[0], cfg.num_warmups))], stop)
        before = await scrape_prefix_cache(client, cfg.base_url)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run = _Run(cfg, client, model, time.perf_counter())
        run.bar = tqdm(total=workload.num_requests, disable=cfg.disable_tqdm, desc=cfg.label or workload.name,
                       unit="req")
        pairs = enumerate(zip(workload.sessions, arrivals, strict=True))
        tasks = [asyncio.create_task(run.session(s, i, a)) for i, (s, a) in pairs]
        interrupted = await _wait(tasks, stop)
        duration = time.perf_counter() - run.t0
        run.bar.close()
        after = await scrape_prefix_cache(client, cfg.base_url)
    info = dict(workload.info, num_sessions=len(workload.sessions), skipped_turns_context=run.skipped_turns)
    return BenchResult(cfg, run.records, duration, started_at, model, info,
                       prefix_cache_hit_rate(before, after), interrupted)


async def _warm_up(run: _Run, session: Session, num: int) -> None:
    """Unmeasured requests first (connection set-up, lazy initialization); failures only warn."""
    for _ in range(num):
        rec = await run.send(session, -1, 0, [])
        if not rec.success:
            logger.warning("warm-up request failed (%s: %s); running anyway", rec.error, rec.error_detail)


async def _wait(tasks: list[asyncio.Task[None]], stop: asyncio.Event | None) -> bool:
    """Wait for every session, or for ``stop``; then cancel what is left. True if stopped early."""
    everything = asyncio.gather(*tasks)
    everything.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" noise
    waiters: list[asyncio.Future[Any]] = [everything]
    if stop is not None:
        waiters.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped = not everything.done()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in waiters[1:]:
            w.cancel()
    if not stopped and (exc := everything.exception()) is not None:
        raise exc  # a bug in the runner, not a server fault (those are records)
    return stopped
