#!/usr/bin/env bash
# The seed's front door. `--local ...` starts on this machine (scripts/start_multi_gpu_server.sh, same flags);
# anything else submits a SLURM job (slurm/start_multi_gpu_slurm.sh, same flags). `--help` shows both.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
local_run=0
args=()
for arg in "$@"; do
    if [ "$arg" = "--local" ]; then local_run=1; else args+=("$arg"); fi
done
if [ "${args[0]:-}" = "--help" ] || [ "${args[0]:-}" = "-h" ]; then
    if [ "$local_run" = 0 ]; then
        echo "usage: start_batch_server.sh --local [launcher flags]   # this machine"
        echo "       start_batch_server.sh [SLURM flags]              # submit a SLURM job"
        echo
    fi
fi
if [ "$local_run" = 1 ]; then
    exec bash "$here/start_multi_gpu_server.sh" "${args[@]}"
fi
exec bash "$here/../slurm/start_multi_gpu_slurm.sh" "${args[@]}"
