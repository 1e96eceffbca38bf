#!/usr/bin/env bash
# Stop exactly the processes a launch recorded in its run directory (balancer first, then workers) and
# verify by pid that none is left. Usage: bash scripts/stop.sh [--run-dir DIR] [--timeout S]   (see --help)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${IB_PYTHON:-$(bash "$root/scripts/venv.sh")/bin/python}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m scripts.stop "$@"
