"""Bar 2 of issue 7: trace replay of tiny scaled-down slices of the Mooncake conversation trace (prompts from its
hash ids) and the Azure conversation trace against a real `tierserve serve`, writing JSON + Markdown + PNGs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tierserve.cli import main

from .fake_server import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def tierserve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("tierserve.server.app")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierserve.cli", "serve", "--port", str(port), "--max-model-len",
             str(MAX_MODEL_LEN), "--kv-cache-memory", "128MiB", "--threads", "2", "--disable-log-requests"],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tierserve serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tierserve serve not healthy after 180 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def replay(url: str, out: Path, *flags: str) -> dict:  # type: ignore[type-arg]
    rc = main(["bench", "serve", "--base-url", url, "--num-requests", "8", "--max-context-tokens",
               str(MAX_MODEL_LEN // 2), "--output-dir", str(out), "--disable-tqdm", "--slo", "ttft=5000,tpot=500",
               *flags])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "report.md").read_text().startswith("# bench serve:")
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    s = result["summary"]
    assert s["completed"] == 8 and s["failed"] == 0, s["failures"]
    assert s["output_throughput"] > 0 and s["ttft_ms"]["p99"] is not None and s["goodput"] is not None
    return result


def test_mooncake_slice(tierserve_url: str, tmp_path: Path) -> None:
    result = replay(tierserve_url, tmp_path, "--workload", "mooncake", "--trace-length-scale", "32",
                    "--trace-time-scale", "0.25")
    info = result["config"]["workload_info"]
    assert info["block_tokens"] == 16 and info["length_scale"] == 32
    # the server counts the same prompt tokens as the synthesized ones (no BOS on /v1/completions prompts)
    assert all(0 < r["prompt_tokens"] <= MAX_MODEL_LEN // 2 for r in result["requests"])


def test_azure_slice(tierserve_url: str, tmp_path: Path) -> None:
    result = replay(tierserve_url, tmp_path, "--workload", "azure", "--trace-length-scale", "16",
                    "--trace-time-scale", "0.1")
    sends = sorted(r["send_time"] for r in result["requests"])
    assert sends[-1] > 0.1  # paced by the trace's own (scaled) timestamps
