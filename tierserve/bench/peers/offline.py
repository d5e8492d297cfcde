"""`bench compare --offline`: the same batch of token-id prompts through each engine's offline API, each in its own
subprocess (its own interpreter and venv), with medians over the timed runs.

The batch (issue 6's): ``num_prompts`` prompts of exactly ``prompt_len`` tokens cut from real text at distinct
offsets, ``max_tokens`` new tokens each, greedy, EOS ignored; every run's output length is checked. Throughput =
tokens of one run / that run's seconds; output tok/s counts generated tokens, total tok/s prompt + generated.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.bench.peers.base import KV_CACHE_GIB, Peer, tail
from tierserve.bench.peers.machine import CpuAccount, IdleCheck

logger = logging.getLogger(__name__)


@dataclass
class OfflineSpec:
    model: str
    model_dir: str
    dtype: str
    threads: int
    num_prompts: int = 64
    prompt_len: int = 256
    max_tokens: int = 128
    num_runs: int = 3
    batch_size: int = 16
    seed: int = 0
    kv_cache_gib: int = KV_CACHE_GIB

    def build(self) -> dict[str, Any]:
        """The spec file's content (``scripts/offline_io.py``), prompts included."""
        return {**asdict(self), "prompts": prompt_ids(self.model, self.num_prompts, self.prompt_len, self.seed)}


def prompt_ids(model: str, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``num_prompts`` windows of ``prompt_len`` token ids from the essay corpus, none overlapping another."""
    from tierserve.bench.sources import TextCutter, WorkloadFileError, load_tokenizer

    ids = TextCutter(load_tokenizer(model), np.random.default_rng(seed)).ids
    num_slots = len(ids) // prompt_len
    if num_slots < num_prompts:
        raise WorkloadFileError(f"the essay corpus holds {num_slots} distinct windows of {prompt_len} tokens, fewer "
                                f"than the {num_prompts} prompts asked for; ask for fewer or shorter prompts")
    slots = np.random.default_rng(seed).choice(num_slots, size=num_prompts, replace=False)
    return [list(ids[s * prompt_len:(s + 1) * prompt_len]) for s in slots.tolist()]


def summarize_runs(raw: dict[str, Any]) -> dict[str, Any]:
    """Median output and total tok/s over the runs, plus the per-run figures."""
    runs = raw["runs_s"]
    out_tps = [raw["output_tokens"] / s for s in runs]
    total_tps = [(raw["output_tokens"] + raw["prompt_tokens"]) / s for s in runs]
    return {"output_throughput": statistics.median(out_tps), "total_token_throughput": statistics.median(total_tps),
            "output_throughput_runs": out_tps, "median_run_s": statistics.median(runs)}


def run_offline_peer(peer: Peer, spec_path: Path, out_dir: Path, threads: int, idle: IdleCheck,
                     timeout_s: float) -> dict[str, Any]:
    """Run one engine's offline script; returns its entry for ``offline.json`` (``status`` ok / crashed)."""
    out_path = out_dir / f"offline_{peer.name}.json"
    log_path = out_dir / "logs" / f"offline_{peer.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = peer.offline_command(spec_path, out_path)
    assert cmd is not None, "callers skip peers without an offline API"
    entry: dict[str, Any] = {"peer": peer.name, "idle_before": idle.to_json(), "log": str(log_path),
                             **peer.describe()}
    t0 = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=peer.offline_env(threads),
                                start_new_session=True)
        account = CpuAccount(proc.pid, watch_every=0.25)  # its workers die with it: read them as it runs
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on Ctrl-C: the engine runs in its own session and would outlive us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    entry["cpu"] = account.finish()
    entry["wall_s"] = time.monotonic() - t0
    if rc != 0 or not out_path.exists():
        why = f"timed out after {timeout_s:.0f} s" if rc is None else f"exited with code {rc}"
        entry.update(status="crashed", error=f"{why}; log {log_path}:\n{tail(log_path, 12)}")
        return entry
    raw = json.loads(out_path.read_text())
    raw["reported_version"] = raw.pop("version", None)  # describe()'s version names the package too
    entry.update(status="ok", **raw, **summarize_runs(raw))
    return entry
