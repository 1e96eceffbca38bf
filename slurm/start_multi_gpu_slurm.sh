#!/usr/bin/env bash
# Submit the inference-balancer SLURM job (balancer + one worker per allocated GPU, across nodes).
#
# A thin wrapper over `python -m slurm.submit`; `--help` lists every flag. The python that runs it (IB_PYTHON,
# else the project's cached venv from scripts/venv.sh) is also the job's default --python, so it must be at the
# same path on the compute nodes (a shared filesystem), or pass --python / --container-image.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${IB_PYTHON:-$(bash "$root/scripts/venv.sh")/bin/python}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m slurm.submit "$@"
