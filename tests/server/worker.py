"""Run the reference ``LLM`` on a worker thread, as the server runs its engine.

On this 2-core machine under load, the same ``LLM.generate`` call took ~5 s on the main thread and ~0.7 s on a
worker thread (torch intra-op threads, 2 in both cases); a worker thread also gives the reference the same
threading as the server's engine thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-llm")


def on_worker(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return _WORKER.submit(fn, *args, **kwargs).result()
