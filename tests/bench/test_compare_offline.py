"""The offline batch: prompts of exact length with no shared windows, medians over runs, output checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tierserve.bench.peers.base import SCRIPTS
from tierserve.bench.peers.offline import prompt_ids, summarize_runs

sys.path.insert(0, str(SCRIPTS))
import offline_io


def test_prompts_exact_and_disjoint() -> None:
    prompts = prompt_ids("smollm2-135m", 64, 256, seed=0)
    assert len(prompts) == 64 and all(len(p) == 256 for p in prompts)
    assert len({tuple(p[:16]) for p in prompts}) == 64
    assert prompts == prompt_ids("smollm2-135m", 64, 256, seed=0)
    assert prompts != prompt_ids("smollm2-135m", 64, 256, seed=1)


def test_summarize_runs_takes_medians() -> None:
    raw = {"runs_s": [10.0, 8.0, 20.0], "output_tokens": 8192, "prompt_tokens": 16384}
    s = summarize_runs(raw)
    assert s["output_throughput"] == pytest.approx(819.2)
    assert s["total_token_throughput"] == pytest.approx(24576 / 10.0)
    assert s["median_run_s"] == 10.0 and len(s["output_throughput_runs"]) == 3


def test_output_lengths_are_checked() -> None:
    spec = {"prompts": [[1], [2]], "max_tokens": 4}
    assert offline_io.check_counts(spec, [4, 4]) == 8
    with pytest.raises(SystemExit, match="lengths \\[3, 4\\]"):
        offline_io.check_counts(spec, [4, 3])
    with pytest.raises(SystemExit):
        offline_io.check_counts(spec, [4])


def test_spec_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r.json"
    spec = {"prompts": [[1, 2, 3], [4, 5, 6]], "max_tokens": 2, "num_runs": 2}
    runs, total = offline_io.timed_runs(spec, lambda: [2, 2])
    offline_io.write_result(str(out), spec, engine="x", runs_s=runs, output_tokens=total)
    import json

    r = json.loads(out.read_text())
    assert r["num_prompts"] == 2 and r["prompt_tokens"] == 6 and r["output_tokens"] == 4 and len(r["runs_s"]) == 2


def test_before_each_runs_untimed_before_every_run() -> None:
    """An engine with a prefix cache empties it before every timed run (vLLM's runs 2..N reused run 1's KV)."""
    events: list[str] = []
    spec = {"prompts": [[1], [2]], "max_tokens": 2, "num_runs": 3}
    runs, total = offline_io.timed_runs(spec, lambda: events.append("run") or [2, 2],
                                        before_each=lambda: events.append("reset"))
    assert events == ["reset", "run"] * 3 and len(runs) == 3 and total == 4

