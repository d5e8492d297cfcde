"""Which llama.cpp build is faster here: the native build (-DGGML_NATIVE=ON) or the prebuilt xllamacpp wheel (AVX2)?

    python scripts/peers/llamacpp_builds.py [--requests 6] [--output bench_results/llamacpp_builds.json]

Starts each build in turn (same GGUF, threads, slots as `bench compare`) and sends single-stream requests (200-token
prompt from the essay corpus, 128 tokens, greedy, EOS ignored) to llama.cpp's native ``/completion``, which returns
the server's own timings, then one wave of 16 concurrent requests. Reports the best and median per-request prompt and
decode speeds: on a shared machine the best of several is the figure least disturbed by neighbours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tierserve.bench.peers import PeerSettings, make_peer
from tierserve.bench.peers.base import free_port
from tierserve.bench.peers.machine import cpu_description, wait_for_idle
from tierserve.bench.peers.offline import prompt_ids


def complete(port: int, prompt: list[int], n: int) -> dict[str, Any]:
    body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True,
                       "cache_prompt": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return dict(json.load(resp)["timings"])


def measure(name: str, prompts: list[list[int]], num_requests: int, threads: int, out_dir: Path) -> dict[str, Any]:
    peer = make_peer(name, PeerSettings(threads=threads))
    if (reason := peer.unavailable_reason()) is not None:
        return {"peer": name, "error": reason}
    wait_for_idle(timeout_s=120)
    port = free_port()
    peer.start(port, threads, out_dir / f"{name}.log")
    try:
        startup = peer.wait_healthy(port, 120)
        complete(port, prompts[0], 16)
        single = [complete(port, p, 128) for p in prompts[1:1 + num_requests]]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            wave = list(pool.map(lambda p: complete(port, p, 128), prompts[-16:]))
        wave_s = time.perf_counter() - t0
    finally:
        peer.stop()
    decode = [t["predicted_per_second"] for t in single]
    prefill = [t["prompt_per_second"] for t in single]
    return {"peer": name, "startup_s": startup, "decode_tok_s_best": max(decode),
            "decode_tok_s_median": statistics.median(decode), "prompt_tok_s_best": max(prefill),
            "prompt_tok_s_median": statistics.median(prefill), "c16_output_tok_s": 16 * 128 / wave_s,
            "c16_decode_tok_s_per_stream_median": statistics.median(t["predicted_per_second"] for t in wave)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="bench_results/llamacpp_builds.json")
    args = p.parse_args()
    out = Path(args.output)
    prompts = prompt_ids("smollm2-135m", args.requests + 17, 200, seed=7)
    rows = [measure(n, prompts, args.requests, args.threads, out.parent / "logs")
            for n in ("llamacpp-native", "llamacpp-xllamacpp")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_description(), "rows": rows}, indent=1))
    json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
