"""Async streaming client for OpenAI-compatible servers (tierserve, llama.cpp's server, vLLM, SGLang).

``send_request`` posts one streaming request to ``/v1/completions`` or ``/v1/chat/completions`` and fills a
``RequestRecord`` with its timings (see ``metrics.py`` for the definitions). It never raises for a server fault:
refused connections, timeouts, HTTP errors, connections closed mid-stream, error events and malformed chunks all
end as ``success=False`` with ``error`` set to a failure kind from ``FAILURE_KINDS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from tierserve.bench.metrics import RequestRecord

logger = logging.getLogger(__name__)

FAILURE_KINDS = {
    "connect_error": "the server refused or could not be reached",
    "timeout": "no complete answer within --request-timeout",
    "http_<status>": "the server answered with an HTTP error status",
    "connection_closed": "the connection dropped before the stream ended",
    "server_error_event": "the stream carried an error object",
    "invalid_response": "a chunk was not valid JSON",
    "empty_response": "the stream ended without any content",
    "interrupted": "the run was stopped (Ctrl-C) while the request was in flight",
    "conversation_aborted": "an earlier turn of the conversation failed, so this turn was never sent",
}


def is_chat(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def build_payload(endpoint: str, model: str, prompt: str | list[dict[str, str]], max_tokens: int,
                  temperature: float, ignore_eos: bool) -> dict[str, Any]:
    """The request body; usage is asked for in the stream (``stream_options.include_usage``)."""
    payload: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                               "stream": True, "stream_options": {"include_usage": True}}
    if is_chat(endpoint):
        payload["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    else:
        if not isinstance(prompt, str):
            raise TypeError("the completions endpoint takes a prompt string")
        payload["prompt"] = prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "connection_closed"
    if isinstance(exc, json.JSONDecodeError):
        return "invalid_response"
    if isinstance(exc, httpx.HTTPError):
        return "http_error"
    return type(exc).__name__


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any], rec: RequestRecord,
                       t0: float, timeout_s: float, count_tokens: Callable[[str], int]) -> None:
    """Send one request and fill ``rec``; ``rec.send_time`` is seconds after ``t0`` (a ``perf_counter`` time).
    The whole request, stream included, is bounded by ``timeout_s``."""
    try:
        await asyncio.wait_for(_stream(client, url, payload, rec, t0, count_tokens), timeout_s)
    except asyncio.CancelledError:
        rec.success, rec.error = False, "interrupted"
        raise
    except Exception as e:
        rec.success, rec.error = False, failure_kind(e)
        rec.error_detail = f"{type(e).__name__}: {e}"[:500]
        logger.debug("request failed: %s", rec.error_detail)


async def _stream(client: httpx.AsyncClient, url: str, payload: dict[str, Any], rec: RequestRecord, t0: float,
                  count_tokens: Callable[[str], int]) -> None:
    chat = "messages" in payload
    parts: list[str] = []
    usage: dict[str, Any] = {}
    st = time.perf_counter()
    rec.send_time = st - t0
    last_choice = last_content = st
    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread())[:500].decode("utf-8", errors="replace")
            rec.error, rec.error_detail = f"http_{resp.status_code}", body
            return
        async for raw in resp.aiter_lines():
            now = time.perf_counter()
            line = raw.strip()
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise json.JSONDecodeError("chunk is not a JSON object", data, 0)
            if obj.get("error"):
                rec.error, rec.error_detail = "server_error_event", json.dumps(obj["error"])[:500]
                return
            if choices := obj.get("choices"):
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    if rec.ttft is None:
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last_content)
                    last_content = now
                    parts.append(text)
                last_choice = now
            if isinstance(obj.get("usage"), dict):
                usage = obj["usage"]
    if rec.ttft is None:
        rec.error, rec.error_detail = "empty_response", "the stream carried no content"
        return
    rec.e2e = last_choice - st
    rec.generated_text = "".join(parts)
    completion = usage.get("completion_tokens")
    rec.output_tokens = completion if isinstance(completion, int) else count_tokens(rec.generated_text)
    if isinstance(usage.get("prompt_tokens"), int):
        rec.prompt_tokens = usage["prompt_tokens"]
    rec.success = True


async def fetch_model_id(client: httpx.AsyncClient, base_url: str) -> str | None:
    """The first model id the server lists at ``/v1/models``, or ``None`` when it does not answer."""
    try:
        resp = await client.get(f"{base_url}/v1/models", timeout=10.0)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except Exception as e:
        logger.warning("could not read the model id from %s/v1/models (%s)", base_url, e)
        return None


async def scrape_prefix_cache(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """Prefix-cache counters from the server's Prometheus ``/metrics``: ``{"hits", "queries"}`` summed over
    labels (vLLM: ``vllm:prefix_cache_hits_total`` / ``..._queries_total``), and ``"rate"`` when a hit-rate
    gauge is exposed instead. ``None`` when there is no endpoint or no such metric."""
    try:
        resp = await client.get(f"{base_url}/metrics", timeout=10.0)
        if resp.status_code != 200:
            return None
        text = resp.text
    except Exception:
        return None
    return parse_prefix_cache(text)


def parse_prefix_cache(text: str) -> dict[str, float] | None:
    families: dict[str, str] = {}  # role → first metric family seen for it
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        low = name.lower()
        if "prefix_cache" not in low or low.endswith("_created"):
            continue
        if "hit_rate" in low or "hitrate" in low:
            role = "rate"
        elif "hit" in low:
            role = "hits"
        elif "quer" in low or "lookup" in low:
            role = "queries"
        else:
            continue
        if families.setdefault(role, name) != name:
            continue
        try:
            out[role] = out.get(role, 0.0) + float(value)
        except ValueError:
            continue
    return out or None


def prefix_cache_hit_rate(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Δhits / Δqueries over the run, else the hit-rate gauge after the run, else ``None``."""
    if after is None:
        return None
    if before is not None and {"hits", "queries"} <= before.keys() and {"hits", "queries"} <= after.keys():
        queries = after["queries"] - before["queries"]
        if queries > 0:
            return (after["hits"] - before["hits"]) / queries
    return after.get("rate")
