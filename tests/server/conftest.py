"""Fixtures: the real `tierserve serve` as a subprocess on a free loopback port, and clients for it.

One main server (float32, so greedy output can be compared with ``LLM.generate``) serves the whole session; the
tests that need other flags (API key, a tiny queue, a short context) start their own in their module.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import openai
import pytest

from tests.server.server_process import KV_CACHE, MAX_MODEL_LEN, ServerProcess
from tests.server.worker import on_worker
from tierserve.engine.llm import LLM


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", KV_CACHE],
                        log)
    yield srv
    status = srv.stop(signal.SIGINT)
    assert status == 0, f"the server exited with {status} on SIGINT:\n{srv.log()[-2000:]}"


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.openai()


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The offline engine with the main server's settings: the reference for greedy outputs (call it through
    ``on_worker``)."""
    return on_worker(LLM, dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_CACHE)
