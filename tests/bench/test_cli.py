"""`tierserve bench serve` end to end against the fake server: files, schema, sweeps, Ctrl-C, bad input, --help."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve.cli import build_parser, main

from .fake_server import FakeServer

REPO = Path(__file__).resolve().parents[2]
CONFIG_KEYS = {"base_url", "model", "workload", "request_rate", "max_concurrency", "num_requests", "seed", "endpoint"}
SUMMARY_KEYS = {"completed", "failed", "failures", "duration_s", "request_throughput", "output_throughput",
                "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput", "prefix_cache_hit_rate"}
REQUEST_KEYS = {"prompt_tokens", "output_tokens", "send_time", "ttft", "itl", "tpot", "e2e", "success", "error"}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(ttft_s=0.02, gap_s=0.005) as s:
        yield s


def check_schema(result: dict) -> None:  # type: ignore[type-arg]
    assert CONFIG_KEYS <= result["config"].keys()
    assert SUMMARY_KEYS <= result["summary"].keys()
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(result["summary"][key]) == {"mean", "median", "p90", "p99"}
    assert all(REQUEST_KEYS <= r.keys() for r in result["requests"])


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_writes_json_markdown_pngs(server: FakeServer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serve", "--base-url", server.url("flaky"), "--num-requests", "6", "--input-len", "16",
               "--output-len", "4", "--max-concurrency", "1", "--num-warmups", "0", "--slo", "ttft=1000,tpot=100",
               "--output-dir", str(tmp_path), "--disable-tqdm"])
    assert rc == 0
    result = json.loads((tmp_path / "result.json").read_text())
    check_schema(result)
    s = result["summary"]
    assert s["completed"] == 4 and s["failures"] == {"http_500": 2} and s["goodput"] > 0
    assert result["config"]["request_rate"] is None and result["config"]["slo"] == {"ttft": 1000.0, "tpot": 100.0}
    md = (tmp_path / "report.md").read_text()
    assert "| run | rate | conc |" in md and "http_500: 2" in md
    assert is_png(tmp_path / "latency_cdf.png")
    assert "TTFT p99" in capsys.readouterr().out


def test_concurrency_sweep(server: FakeServer, tmp_path: Path) -> None:
    rc = main(["bench", "serve", "--base-url", server.url("ok"), "--num-requests", "4", "--input-len", "16",
               "--output-len", "3", "--max-concurrency", "1,2", "--output-dir", str(tmp_path), "--disable-tqdm"])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"]["max_concurrency"] for r in results] == [1, 2]
    for r, label in zip(results, ("conc1", "conc2"), strict=True):
        check_schema(r)
        assert json.loads((tmp_path / f"result_{label}.json").read_text()) == r
    assert is_png(tmp_path / "sweep.png") and is_png(tmp_path / "latency_cdf.png")
    md = (tmp_path / "report.md").read_text()
    assert "| conc1 | inf | 1 |" in md and "| conc2 | inf | 2 |" in md


def test_no_server_is_a_failed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every request failing (nothing listens at the URL) still writes the results, but exits 1 (it exited 0, so
    scripts and CI could not tell)."""
    from tests.server.server_process import free_port

    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-requests", "2",
               "--input-len", "8", "--output-len", "2", "--num-warmups", "0", "--output-dir", str(tmp_path),
               "--disable-tqdm", "--no-plots"])
    assert rc == 1 and "every request failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "result.json").read_text())["summary"]["completed"] == 0


def test_malformed_trace_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "trace.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\nnot json\n')
    rc = main(["bench", "serve", "--workload", "mooncake", "--dataset-path", str(bad), "--num-requests", "2",
               "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err


def test_ctrl_c_writes_partial_results(server: FakeServer, tmp_path: Path) -> None:
    before = len(server.requests)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierserve.cli", "bench", "serve", "--base-url", server.url("slow"),
         "--num-requests", "3", "--num-warmups", "0", "--input-len", "16", "--output-len", "2",
         "--output-dir", str(tmp_path), "--disable-tqdm"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(server.requests) < before + 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["summary"]["interrupted"] and result["summary"]["failures"] == {"interrupted": 3}
    assert "interrupted" in out


def serve_parser() -> argparse.ArgumentParser:
    def sub(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]  # type: ignore[no-any-return]

    return sub(sub(build_parser(), "bench"), "serve")


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    p = serve_parser()
    for action in p._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit):
        main(["bench", "serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--request-rate", "--max-concurrency", "--slo", "--trace-length-scale", "--request-timeout"):
        assert flag in text


def test_api_key_is_sent_and_not_written(server: FakeServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A server started with an API key can be benchmarked (--api-key, or OPENAI_API_KEY as vLLM's bench reads it);
    the key never reaches the result files."""
    before = len(server.auth)
    rc = main(["bench", "serve", "--base-url", server.url("ok"), "--num-requests", "2", "--input-len", "8",
               "--output-len", "2", "--num-warmups", "0", "--api-key", "sekret-1", "--output-dir", str(tmp_path),
               "--disable-tqdm", "--no-plots"])
    assert rc == 0 and server.auth[before:] == ["Bearer sekret-1"] * 2
    assert "sekret-1" not in (tmp_path / "result.json").read_text()
    monkeypatch.setenv("OPENAI_API_KEY", "sekret-2")
    rc = main(["bench", "serve", "--base-url", server.url("ok"), "--num-requests", "1", "--input-len", "8",
               "--output-len", "2", "--num-warmups", "0", "--output-dir", str(tmp_path / "env"), "--disable-tqdm",
               "--no-plots"])
    assert rc == 0 and server.auth[-1] == "Bearer sekret-2"


@pytest.mark.parametrize("args, flag", [
    (["--output-len", "0"], "--output-len"),  # (0 was taken as "not set": 128 tokens were asked for)
    (["--input-len", "0"], "--input-len"), (["--num-warmups", "-1"], "--num-warmups"),
    (["--request-rate", "nan"], "--request-rate"), (["--base-url", "127.0.0.1:8000"], "--base-url"),
    (["--workload", "mooncake", "--trace-length-scale", "0"], "--trace-length-scale"),  # (a ZeroDivisionError)
    (["--workload", "mooncake", "--trace-offset", "-5"], "--trace-offset"),
    (["--workload", "mooncake", "--max-context-tokens", "0"], "--max-context-tokens"),
])
def test_bad_flags_stop_before_anything_is_sent(args: list[str], flag: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serve", "--num-requests", "2", "--output-dir", str(tmp_path), "--disable-tqdm", *args])
    assert rc == 2 and flag in capsys.readouterr().err


def test_every_request_answered_with_an_error_names_it(server: FakeServer, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serve", "--base-url", server.url("error500"), "--num-requests", "2", "--input-len", "8",
               "--output-len", "2", "--num-warmups", "0", "--output-dir", str(tmp_path), "--disable-tqdm",
               "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 1 and "mostly http_500" in err and "answered http_500" in err and "is the server up" not in err
