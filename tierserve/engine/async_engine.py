"""AsyncEngine: one background thread runs ``LLMEngine.step()``; asyncio code submits requests and reads deltas.

Threads and ownership:

- The **engine thread** alone touches the ``LLMEngine`` scheduler state. It sleeps on a condition variable while
  there is nothing to do (an idle server uses no CPU), and between two steps it applies the operations queued by
  the event loop (add, abort) in arrival order. The forward pass runs in torch, which releases the GIL, so the
  event loop keeps serving HTTP during a step.
- The **event loop** owns every ``RequestStream``. The engine thread hands each step's deltas over with a single
  ``loop.call_soon_threadsafe`` and the loop routes them to their streams.

Backpressure: ``max_waiting`` bounds the sequences that are accepted but not running (queued here or waiting in the
scheduler). A request is accepted while fewer than ``max_waiting`` sequences wait, otherwise ``QueueFullError``.
Closing a stream before it finished aborts its requests; the engine frees their KV blocks before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from tierserve.engine.llm_engine import EngineStats, LLMEngine
from tierserve.errors import InvalidRequestError, TierserveError
from tierserve.outputs import RequestOutput
from tierserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


def build_off_main_thread(factory: Callable[[], T]) -> T:
    """Run ``factory`` (which builds the engine) on a short-lived thread and return its result (or raise its error).

    Why: the engine's steps run on the engine thread, and every torch / native kernel call there opens an OpenMP
    parallel region. GNU OpenMP keeps one pool of worker threads per thread that opens regions; once the pools hold
    more threads than there are CPUs, it stops letting idle workers spin and puts them to sleep after ~1000 spins, so
    every region pays a futex wake-up. Loading the model on the main thread left its pool behind and made every
    kernel call on the engine thread slow (`pytest tests/engine/test_engine_thread.py -s` prints both layouts;
    served one-stream TPOT went 17.3 -> 9.4 ms with this fix, BENCHMARKS.md). A pool is freed when its thread
    exits, so building on a thread that then exits leaves the engine thread's pool alone.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = factory()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="tierserve-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return cast(T, box["value"])


class QueueFullError(TierserveError):
    """Too many sequences are waiting; the client should retry later."""

    def __init__(self, num_waiting: int, max_waiting: int) -> None:
        super().__init__(f"the server is busy: {num_waiting} sequence(s) waiting, the limit (--max-waiting) is "
                         f"{max_waiting}; retry later")
        self.num_waiting = num_waiting
        self.max_waiting = max_waiting


class EngineDeadError(TierserveError):
    """The engine thread failed or was stopped; no request can be served."""


@dataclass
class EngineRequest:
    """One prompt to generate for, already tokenized and validated with ``LLMEngine.validate_prompt``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    """``time.monotonic()`` when the HTTP request arrived (the clock of the engine's RequestMetrics)."""
    priority: int = 0
    """Lower is served first under the priority scheduling policy."""


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """The deltas of one or more engine requests (e.g. one per prompt of a completions call), in step order.

    Iterate on the event loop; it ends when every request finished. ``close()`` aborts those that did not.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.unfinished: set[str] = set(request_ids)

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self.unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    def close(self) -> list[str]:
        """Abort the requests that have not finished; returns their ids."""
        aborted = sorted(self.unfinished)
        self.unfinished.clear()
        self._engine.abort(aborted)
        return aborted


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._inbox: list[EngineRequest | _Abort] = []
        self._num_queued = 0
        """Sequences in the inbox or added since the last stats snapshot (guarded by _cond)."""
        self._stats = engine.stats()
        """Snapshot after the last step or abort (guarded by _cond)."""
        self._stopping = False
        self._error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        """request id -> stream; touched only on the event loop."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._live: set[str] = set()
        """Request ids added to the engine and not yet finished or aborted; touched only by the engine thread."""

    # ---------------------------------------------------------------- event-loop side
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tierserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None and not self._stopping

    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats

    def submit(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue requests (all or none) and return the stream of their deltas.

        Raises QueueFullError when the waiting queue is full, EngineDeadError when the engine is not running and
        InvalidRequestError when the request alone has more sequences (prompts x n) than the queue may hold.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine is not running (stopped or failed; see the server log)")
        num_seqs = sum(r.params.n for r in requests)
        if num_seqs > self.max_waiting:
            raise InvalidRequestError(f"the request has {num_seqs} sequences (prompts x n) but at most "
                                      f"{self.max_waiting} may wait (--max-waiting); split it", param="n")
        with self._cond:
            waiting = self._num_queued + self._stats.num_waiting
            if waiting >= self.max_waiting:
                raise QueueFullError(waiting, self.max_waiting)
            stream = RequestStream(self, [r.request_id for r in requests])
            for r in requests:
                self._streams[r.request_id] = stream
            self._num_queued += num_seqs
            self._inbox.extend(requests)
            self._cond.notify()
        return stream

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
        if not request_ids:
            return
        with self._cond:
            self._inbox.extend(_Abort(rid) for rid in request_ids)
            self._cond.notify()

    def abort_all(self) -> None:
        """End every in-flight request now: its stream raises EngineDeadError (the handlers then report it), and
        its engine requests are aborted when the stream closes."""
        self._fail_all(EngineDeadError("the server is shutting down; the request was aborted"))

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.abort_all()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # closed by its client; the abort is on its way to the engine
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._streams):
            self._fail(rid, error)

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        assert self._loop is not None
        busy = False
        try:
            while True:
                with self._cond:
                    while not self._inbox and not busy and not self._stopping:
                        self._cond.wait()
                    ops, self._inbox = self._inbox, []
                    stopping = self._stopping
                if stopping:
                    self._stop_engine()
                    return
                num_added = self._apply(ops)
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                busy = self.engine.has_unfinished_requests()
                with self._cond:
                    self._num_queued -= num_added
                    self._stats = self.engine.stats()
                self._live.difference_update(o.request_id for o in outputs if o.finished)
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except Exception as e:
            logger.exception("engine step failed; the engine is stopped")
            with self._cond:
                self._error = e
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine failed: {e!r}"))

    def _apply(self, ops: list[EngineRequest | _Abort]) -> int:
        """Apply queued adds and aborts in order; returns the number of sequences added."""
        num_added = 0
        assert self._loop is not None
        for op in ops:
            if isinstance(op, _Abort):
                if op.request_id in self._live:
                    self._live.discard(op.request_id)
                    self.engine.abort(op.request_id)
                continue
            num_added += op.params.n
            try:
                self.engine.add_request(op.request_id, op.prompt_token_ids, op.params, priority=op.priority,
                                        arrival_time=op.arrival_time)
            except TierserveError as e:
                self._loop.call_soon_threadsafe(self._fail, op.request_id, e)
            except Exception as e:  # a bug while adding one request fails that request, not the engine
                logger.exception("adding request %s failed", op.request_id)
                self.engine.abort(op.request_id)
                self._loop.call_soon_threadsafe(self._fail, op.request_id, e)
            else:
                self._live.add(op.request_id)
        return num_added

    def _stop_engine(self) -> None:
        """Abort every request in the engine (the inbox is dropped) so that no KV block stays allocated."""
        for rid in self._live:
            self.engine.abort(rid)
        self._live.clear()
        with self._cond:
            self._num_queued = 0
            self._stats = self.engine.stats()
        logger.info("engine stopped")
