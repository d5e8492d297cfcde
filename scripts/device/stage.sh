#!/usr/bin/env bash
# Device call 1 of 2 (carry .device/p1, made by scripts/device/prep.sh): leave the model's first part in /tmp on the
# lent machine, which keeps it while it stays warm (30 s after a call) for call 2, scripts/device/bar5.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE="${STAGE:-/tmp/tierserve-stage}"
mkdir -p "$STAGE"
cp .device/p1/model.part1 "$STAGE/"
ls -l "$STAGE"
nvidia-smi -L || true
"${PY:-python3}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
