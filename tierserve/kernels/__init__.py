"""Native kernels, compiled on first use for the CPU they run on (torch's C++ extension builder, cached).

``cpu_ops()`` returns the compiled module, or ``None`` when it cannot be built here (no C++ compiler, no ninja,
``TIERSERVE_NO_NATIVE=1``); callers then fall back to plain torch ops. ``TIERSERVE_REQUIRE_NATIVE=1`` (set by the
test script) turns a failed build into an error instead, so a broken kernel cannot hide behind the fallback. The
build is cached per torch version and CPU feature set under ``$TIERSERVE_CACHE_DIR`` (default ``~/.cache/tierserve``)
and takes about half a minute the first time.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from tierserve.utils.cpu import cpu_info

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_cpu_ops: ModuleType | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("TIERSERVE_CACHE_DIR", Path.home() / ".cache" / "tierserve"))


def build_dir() -> Path:
    """Where this machine's build lives: one folder per source digest, torch version and CPU feature set."""
    digest = hashlib.sha256()
    for src in sorted(_CSRC.glob("*.[ch]*")):
        digest.update(src.name.encode())
        digest.update(src.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(sorted(cpu_info().flags)).encode())
    return cache_dir() / "kernels" / digest.hexdigest()[:16]


@contextmanager
def _build_guard(build: Path) -> Iterator[None]:
    """Hold an ``flock`` on ``build/.tierserve-build`` while torch builds or loads the kernels.

    torch marks a build in progress with a plain ``lock`` file and makes every later load wait until it is gone; a
    build that was killed (Ctrl-C, a timeout) leaves it behind, and from then on every start hung without a word.
    The flock is released by the OS when its holder dies, so once we hold it no live tierserve process is building
    here and a ``lock`` file is stale: it is removed. (A live build in another process is waited for, as before.)
    """
    with open(build / ".tierserve-build", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            logger.warning("removing %s, left by an interrupted kernel build", stale)
            stale.unlink(missing_ok=True)
        yield


def cpu_ops() -> ModuleType | None:
    """The compiled CPU kernels (built once per machine), or None where they cannot be built."""
    global _cpu_ops, _tried
    with _lock:
        if _tried:
            return _cpu_ops
        _tried = True
        if os.environ.get("TIERSERVE_NO_NATIVE", "") not in ("", "0"):
            logger.info("native kernels disabled by TIERSERVE_NO_NATIVE")
            return None
        sources = sorted(_CSRC.glob("*.cpp"))
        build = build_dir()
        build.mkdir(parents=True, exist_ok=True)
        tag = build.name
        try:
            from torch.utils.cpp_extension import load

            logger.info("loading native CPU kernels (first use builds them, ~1 min) from %s", build)
            with _build_guard(build):
                _cpu_ops = load(
                    name=f"tierserve_cpu_{tag}",
                    sources=[str(s) for s in sources],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build),
                    verbose=False,
                )
        except Exception as exc:  # no compiler / ninja, or a build error: plain torch ops still work
            if os.environ.get("TIERSERVE_REQUIRE_NATIVE", "") not in ("", "0"):
                raise RuntimeError(f"native CPU kernels failed to build in {build}") from exc
            logger.warning("native CPU kernels unavailable (%s: %s); using plain torch ops",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _cpu_ops = None
        return _cpu_ops


def loaded_cpu_ops() -> ModuleType | None:
    """The compiled CPU kernels if this process already loaded them (``cpu_ops()``), else None - never builds (for
    optional fast paths in code that must not trigger a first-use build, e.g. the sampler under the torch backend)."""
    with _lock:
        return _cpu_ops


def load_build(name: str) -> ModuleType:
    """Load another build of the kernels from ``cache_dir()/kernels/<name>`` (a folder ``build_dir()`` made for some
    source tree) beside this process's own - for A/B comparisons of kernel changes in one process
    (``scripts/decode_attention_bench.py``, ``scripts/kernel_build_ab.py``). Its globals (e.g. the decode order) are
    its own."""
    import importlib.util

    found = sorted((cache_dir() / "kernels" / name).glob("*.so"))
    if not found:
        raise FileNotFoundError(f"no kernel build in {cache_dir() / 'kernels' / name}")
    spec = importlib.util.spec_from_file_location(found[0].stem, found[0])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {found[0]}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

