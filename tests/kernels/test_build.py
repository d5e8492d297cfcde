"""The native kernels' build cache: an interrupted build must not make later starts hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tierserve.kernels import build_dir, cpu_ops, load_build

needs_native = pytest.mark.skipif(cpu_ops() is None, reason="native kernels cannot be built here")


@needs_native
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load() -> None:
    # torch's build marker, as a build killed mid-way leaves it (its owner is gone)
    lock = build_dir() / "lock"
    lock.write_text("")
    env = dict(os.environ, TIERSERVE_REQUIRE_NATIVE="1")
    code = "from tierserve.kernels import cpu_ops; import sys; sys.exit(0 if cpu_ops() is not None else 1)"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, timeout=300, capture_output=True, text=True)
    finally:
        stale = lock.exists()
        lock.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale
    assert "interrupted kernel build" in done.stderr


@needs_native
def test_load_build_finds_a_build_by_its_folder_and_names_a_missing_one() -> None:
    ops = cpu_ops()
    assert ops is not None
    same = load_build(build_dir().name)  # this tree's own build: the module already loaded
    assert same is ops and callable(same.paged_decode)
    with pytest.raises(FileNotFoundError, match=r"no kernel build in .*no-such-build"):
        load_build("no-such-build")

