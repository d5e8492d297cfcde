#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The native CPU kernels must build here (the engine would fall back to plain torch ops, and their tests would skip).
export TIERSERVE_REQUIRE_NATIVE="${TIERSERVE_REQUIRE_NATIVE:-1}"
exec python -m pytest -q -p no:cacheprovider "$@"
