#!/usr/bin/env bash
# Start one worker per GPU (or N CPU workers) behind the load balancer on this machine; Ctrl-C stops all.
#
# A thin wrapper over `python -m scripts.launch` in the project's cached venv: every flag is documented by
# `bash scripts/start_multi_gpu_server.sh --help`. Examples:
#   bash scripts/start_multi_gpu_server.sh --model-path DIR --gpus 4 --batch-size 8
#   bash scripts/start_multi_gpu_server.sh --model-path DIR --cpu-workers 2
#   bash scripts/start_multi_gpu_server.sh --model-path DIR --engine vllm --vllm-python "$(bash scripts/vllm_venv.sh)" -- --enforce-eager
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${IB_PYTHON:-$(bash "$root/scripts/venv.sh")/bin/python}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m scripts.launch "$@"
