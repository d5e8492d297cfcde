"""tierserve itself, run like any peer: `tierserve serve` in a child process, and `LLM.generate` offline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tierserve.bench.peers.base import KV_CACHE_GIB, SCRIPTS, Peer


class TierservePeer(Peer):
    name = "tierserve"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("tierserve.server.app") is None:
            return "tierserve's server (tierserve.server.app) is not in this checkout"
        return None

    def install(self) -> None:
        """Nothing to install: it runs from the project's own environment."""

    def server_command(self, port: int, threads: int) -> list[str]:
        return [sys.executable, "-m", "tierserve.cli", "serve", "--model", self.settings.model,
                "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
                "--kv-cache-memory", f"{KV_CACHE_GIB}GiB", "--disable-log-requests"]

    def offline_command(self, spec_path: Path, out_path: Path) -> list[str]:
        return [sys.executable, str(SCRIPTS / "tierserve_offline.py"), str(spec_path), str(out_path)]

    def describe(self) -> dict[str, str]:
        from tierserve import __version__

        return {"version": __version__, "weights": f"{self.settings.model} (GGUF, dequantized at load)"}
