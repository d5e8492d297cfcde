"""A server started with ``--scheduling-policy priority`` serves a request's ``priority`` field (vLLM's: lower first);
it was once read by the engine but dropped by the server, so the policy had no effect there."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.server.server_process import ServerProcess


@pytest.fixture(scope="module")
def prio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("priority") / "server.log"
    srv = ServerProcess(["--scheduling-policy", "priority", "--max-num-seqs", "1", "--kv-cache-memory", "64MiB"], log)
    yield srv
    srv.stop()


def test_lower_priority_value_is_served_first(prio_server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient, name: str, priority: int, max_tokens: int, delay: float,
                  done: list[str]) -> None:
        await asyncio.sleep(delay)
        r = await client.post(f"{prio_server.url}/v1/completions",
                              json={"prompt": f"Request {name}:", "max_tokens": max_tokens, "ignore_eos": True,
                                    "temperature": 0, "priority": priority})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == max_tokens
        done.append(name)

    async def run() -> list[str]:
        done: list[str] = []
        async with httpx.AsyncClient(timeout=300) as client:
            # A occupies the one running slot; B (priority 5) arrives before C (priority -5): C must finish first
            await asyncio.gather(one(client, "A", 0, 120, 0.0, done), one(client, "B", 5, 60, 0.4, done),
                                 one(client, "C", -5, 4, 0.8, done))
        return done

    done = asyncio.run(run())
    assert done.index("C") < done.index("B"), done
    bad = httpx.post(f"{prio_server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, "priority": "high"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority", bad.text
