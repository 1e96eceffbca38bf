#!/usr/bin/env bash
# The main job in one command: the balancer in front of one worker per GPU, or CPU workers on a tiny local
# model when no GPU is present. Set MODEL_PATH to serve your own model; extra arguments go to the launcher
# (see `bash scripts/start_multi_gpu_server.sh --help`). Ctrl-C stops everything.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(bash scripts/venv.sh hf,dev)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$venv/bin:$PATH"
model=${MODEL_PATH:-${IB_CACHE_DIR:-$HOME/.cache/inference-balancer}/demo-tiny-model}
if [ ! -f "$model/config.json" ]; then
    echo "[demo] building the tiny local model in $model"
    python -m workers.tiny_model "$model"
fi
gpu_args=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    gpu_args=(--cpu-workers 2)
fi
exec bash scripts/start_multi_gpu_server.sh --model-path "$model" "${gpu_args[@]}" "$@"
