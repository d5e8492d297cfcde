"""`tierserve bench latency` end to end on the real model: its JSON holds the figures the roofline claim is made of,
with the memory bandwidth measured around every timed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve.cli import main

pytestmark = pytest.mark.slow


def test_latency_json(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--runs", "2", "--input-len", "16", "--output-len", "8",
                 "--kv-cache-memory", "64MiB", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    bws = r["runs"]["mem_read_gbps"]
    assert len(bws) == 3 and all(b > 0 for b in bws)  # at start and after each run
    assert r["peaks"]["mem_read_gbps"] == pytest.approx(sorted(bws)[1])  # the median is the roofline's bandwidth
    assert r["bandwidth_roofline_tpot_s"] == pytest.approx(r["weight_bytes"] / (sorted(bws)[1] * 1e9), rel=1e-6)
    assert r["bandwidth_roofline_fraction"] == pytest.approx(r["bandwidth_roofline_tpot_s"] / r["tpot_s"])
    assert len(r["runs"]["tpot_s"]) == 2 and r["tpot_s"] > 0


def test_throughput_json(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder" / "throughput.json"  # made before the run (it used to end in a traceback)
    assert main(["bench", "throughput", "--runs", "2", "--num-prompts", "3", "--input-len", "16", "--output-len", "4",
                 "--kv-cache-memory", "64MiB", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    reads = r["mem_read_gbps_reads"]
    assert len(reads) == 3 and r["peaks"]["mem_read_gbps"] == pytest.approx(sorted(reads)[1])
    gemms = r["gemm_tflops_reads"]  # the compute dtype's GEMM peak is read again after each run, its median used
    assert len(gemms) == 3 and all(g > 0 for g in gemms)
    key = "gemm_tflops_fp32" if r["dtype"] == "float32" else "gemm_tflops_bf16"
    assert r["peaks"][key] == pytest.approx(sorted(gemms)[1])
    if r["dtype"] == "float32" and not (r["amx"] or r["avx512_bf16"]):
        assert r["peaks"]["gemm_tflops_bf16"] is None  # not measured in emulation (it took minutes)
    assert r["device"] == "cpu" and r["device_name"] == r["cpu"]  # the machine is named (a GPU's name on CUDA)
    assert r["output_throughput"] == pytest.approx(3 * 4 / r["median_s"])
    assert r["roofline_fraction"] == pytest.approx(r["roofline_s"] / r["median_s"])


def test_python_dash_m_runs_the_cli() -> None:
    """``python -m tierserve`` (a checkout on PYTHONPATH, as scripts/device/bar5.sh runs it on a GPU machine)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tierserve", "bench", "throughput", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--device" in out.stdout and "--num-prompts" in out.stdout, out.stderr


def test_unwritable_json_fails_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "latency", "--runs", "1", "--json", str(blocker / "x.json")]) == 2
    assert "cannot write --json" in capsys.readouterr().err
