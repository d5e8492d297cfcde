"""The offline batch's spec and result files, shared by every ``*_offline.py`` script (stdlib only).

Spec: ``{"prompts": [[token ids], ...], "max_tokens": int, "num_runs": int, "batch_size": int, "threads": int,
"model": str (tierserve's name or GGUF), "model_dir": str (safetensors folder), "dtype": str}``.
Result: ``{"engine", "version", "dtype", "load_s", "warmup_s", "runs_s": [s per run], "num_prompts",
"prompt_tokens", "output_tokens"}``; token counts are per run and were checked after every run.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

WARMUP_PROMPTS = 4
WARMUP_TOKENS = 8


def read_spec() -> tuple[dict[str, Any], str]:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json OUT.json")
    with open(sys.argv[1]) as f:
        return json.load(f), sys.argv[2]


def check_counts(spec: dict[str, Any], output_lens: list[int]) -> int:
    """Every prompt must have produced exactly ``max_tokens`` (greedy, EOS ignored); returns the total."""
    want = spec["max_tokens"]
    bad = [n for n in output_lens if n != want]
    if len(output_lens) != len(spec["prompts"]) or bad:
        sys.exit(f"expected {len(spec['prompts'])} outputs of {want} tokens, got {len(output_lens)} "
                 f"with lengths {sorted(set(output_lens))}")
    return sum(output_lens)


def timed_runs(spec: dict[str, Any], run_once: Any, before_each: Any = None) -> tuple[list[float], int]:
    """Call ``run_once() -> list of output lengths`` ``num_runs`` times; seconds per run and tokens per run.
    ``before_each()``, untimed, before every run: an engine with a prefix cache empties it there, so that no run
    reuses the KV of the same prompts from the warm-up or an earlier run (every run a new batch, as for an engine
    without one)."""
    runs, total = [], 0
    for i in range(spec["num_runs"]):
        if before_each is not None:
            before_each()
        t0 = time.perf_counter()
        lens = run_once()
        runs.append(time.perf_counter() - t0)
        total = check_counts(spec, lens)
        print(f"run {i + 1}/{spec['num_runs']}: {runs[-1]:.2f} s, {total / runs[-1]:.1f} output tok/s",
              file=sys.stderr, flush=True)
    return runs, total


def write_result(out_path: str, spec: dict[str, Any], **fields: Any) -> None:
    result = {"num_prompts": len(spec["prompts"]), "prompt_tokens": sum(len(p) for p in spec["prompts"]), **fields}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
