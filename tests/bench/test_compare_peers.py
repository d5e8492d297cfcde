"""Peers of `bench compare`: names, where they install, the command lines and environments they start with, and
the process lifecycle (start, health, crash, stop) with a stand-in server. No real peer runs here."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tierserve.bench.peers import PEERS, PeerSettings, make_peer, peers_dir
from tierserve.bench.peers.base import KV_CACHE_GIB, Peer, PeerStartError, free_port
from tierserve.bench.peers.llamacpp import server_flags
from tierserve.bench.peers.serving import CompareConfig, auto_num_requests, requests_per_level
from tierserve.bench.peers.vllm_cpu import TCMALLOC_LIB, VllmCpu, VllmCpuZen, cpu_list


def settings(tmp_path: Path) -> PeerSettings:
    return PeerSettings(model="smollm2-135m", threads=2, num_slots=16, slot_context=512, root=tmp_path)


def test_peers_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TIERSERVE_PEERS_DIR", raising=False)
    assert peers_dir() == Path.home() / ".cache" / "tierserve" / "peers"
    monkeypatch.setenv("TIERSERVE_PEERS_DIR", str(tmp_path))
    assert peers_dir() == tmp_path
    assert PeerSettings().root == tmp_path


def test_names_and_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(tmp_path)
    assert set(PEERS) == {"tierserve", "llamacpp-native", "llamacpp-xllamacpp", "vllm-cpu", "vllm-zen",
                          "transformers"}
    assert make_peer("llamacpp", s).name == "llamacpp-xllamacpp"  # nothing built under tmp_path
    (tmp_path / "llamacpp" / "native").mkdir(parents=True)
    (tmp_path / "llamacpp" / "native" / "llama-server").write_text("")
    assert make_peer("llamacpp", s).name == "llamacpp-native"
    monkeypatch.setattr("tierserve.bench.peers.is_amd", lambda: True)
    assert make_peer("vllm", s).name == "vllm-zen"
    monkeypatch.setattr("tierserve.bench.peers.is_amd", lambda: False)
    assert make_peer("vllm", s).name == "vllm-cpu"
    with pytest.raises(ValueError, match="unknown peer 'sglang'"):
        make_peer("sglang", s)


def test_missing_peers_say_how_to_install(tmp_path: Path) -> None:
    s = settings(tmp_path)
    for name in ("llamacpp-native", "llamacpp-xllamacpp", "vllm-cpu"):
        reason = make_peer(name, s).unavailable_reason()
        assert reason is not None and f"scripts/peers/install.sh {name}" in reason
    assert make_peer("tierserve", s).available()


def test_llamacpp_flags() -> None:
    flags = server_flags(Path("/m.gguf"), 8080, 2, 16, 512)
    assert flags[:2] == ["-m", "/m.gguf"]
    pairs = dict(zip(flags[2::2], flags[3::2], strict=False))
    assert flags[flags.index("--host") + 1] == "127.0.0.1" and flags[flags.index("--port") + 1] == "8080"
    assert flags[flags.index("--parallel") + 1] == "16" and flags[flags.index("-c") + 1] == str(16 * 512)
    assert flags[flags.index("--threads") + 1] == flags[flags.index("--threads-batch") + 1] == "2"
    assert "--cont-batching" in flags and pairs


def test_xllamacpp_command_uses_its_venv(tmp_path: Path) -> None:
    cmd = make_peer("llamacpp-xllamacpp", settings(tmp_path)).server_command(9000, 2)
    assert cmd[0] == str(tmp_path / "llamacpp" / "venv" / "bin" / "python")
    assert cmd[1].endswith("scripts/xllamacpp_server.py") and cmd[-1] == str(16 * 512)


def test_cpu_list() -> None:
    assert cpu_list(2, {0, 1, 2, 3}) == "0-1"
    assert cpu_list(4, {0, 1, 4, 6, 7}) == "0-1,4,6"
    assert cpu_list(1, {3}) == "3"


def test_vllm_command_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("VIRTUAL_ENV", "/work/main/.venv")
    peer = VllmCpu(settings(tmp_path))
    cmd = peer.server_command(8001, 2)
    assert cmd[0] == str(tmp_path / "vllm" / "venv" / "bin" / "python") and cmd[1].endswith("vllm_serve.py")
    assert cmd[2:4] == ["serve", str(tmp_path / "models" / "smollm2-135m-bf16")]
    assert cmd[cmd.index("--max-model-len") + 1] == "512" and cmd[cmd.index("--port") + 1] == "8001"
    env = peer.server_env(2)
    assert env["LD_PRELOAD"].split(":")[:2] == [str(tmp_path / "vllm" / "tcmalloc" / TCMALLOC_LIB),
                                                str(tmp_path / "vllm" / "venv" / "lib" / "libiomp5.so")]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == cpu_list(2)
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    for key in ("HF_HOME", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[key].startswith(str(tmp_path / "vllm")), key
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert VllmCpuZen(settings(tmp_path)).server_env(2)["PYTHONPATH"] == str(tmp_path / "vllm" / "zentorch-site")


def test_tierserve_and_transformers_run_in_the_project_env(tmp_path: Path) -> None:
    cmd = make_peer("tierserve", settings(tmp_path)).server_command(8002, 2)
    assert cmd[:5] == [sys.executable, "-m", "tierserve.cli", "serve", "--model"]
    assert cmd[cmd.index("--threads") + 1] == "2" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    # vLLM-CPU's KV budget (VLLM_CPU_KVCACHE_SPACE): with its own 1 GiB default tierserve preempted in float32
    assert cmd[cmd.index("--kv-cache-memory") + 1] == f"{KV_CACHE_GIB}GiB"
    assert VllmCpu(settings(tmp_path)).server_env(2)["VLLM_CPU_KVCACHE_SPACE"] == str(KV_CACHE_GIB)
    cmd = make_peer("transformers", settings(tmp_path)).server_command(8003, 2)
    assert cmd[0] == sys.executable and cmd[1].endswith("hf_server.py")
    assert make_peer("llamacpp-native", settings(tmp_path)).offline_command(Path("s"), Path("o")) is None
    assert make_peer("vllm-cpu", settings(tmp_path)).offline_command(Path("s"), Path("o")) is not None


def test_compare_config_sizes() -> None:
    cfg = CompareConfig(concurrency=[1, 4, 16])
    s = cfg.settings()
    assert s.num_slots == 16 and s.slot_context == 512
    assert CompareConfig(input_len=1000, output_len=128).settings().slot_context == 1216
    assert [auto_num_requests(c) for c in (1, 4, 16)] == [16, 16, 64]
    assert requests_per_level(CompareConfig(num_requests=[20])) == [20, 20, 20]
    with pytest.raises(ValueError, match="one per concurrency"):
        requests_per_level(CompareConfig(num_requests=[1, 2]))


class StandIn(Peer):
    """A peer whose 'server' is Python's http.server (any GET of an existing path answers 200)."""

    name = "stand-in"

    def __init__(self, s: PeerSettings, crash: bool = False) -> None:
        super().__init__(s)
        self.crash = crash

    def unavailable_reason(self) -> str | None:
        return None

    def install(self) -> None:
        pass

    def health_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/"

    def server_command(self, port: int, threads: int) -> list[str]:
        if self.crash:
            return [sys.executable, "-c", "import sys; print('boom: no model'); sys.exit(3)"]
        return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_lifecycle_start_healthy_stop(tmp_path: Path) -> None:
    peer = StandIn(settings(tmp_path))
    port = free_port()
    proc = peer.start(port, 1, tmp_path / "logs" / "s.log")
    try:
        assert peer.wait_healthy(port, 30) < 30
    finally:
        peer.stop()
    assert proc.poll() is not None and peer.proc is None
    peer.stop()  # idempotent


def test_crash_before_healthy_names_the_log(tmp_path: Path) -> None:
    peer = StandIn(settings(tmp_path), crash=True)
    peer.start(free_port(), 1, tmp_path / "crash.log")
    t0 = time.monotonic()
    with pytest.raises(PeerStartError, match=r"(?s)exited \(code 3\).*crash\.log.*boom: no model"):
        peer.wait_healthy(free_port(), 30)
    assert time.monotonic() - t0 < 10
