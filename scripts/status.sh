#!/usr/bin/env bash
# Print the recorded cluster as a table (worker, GPU, port, pid, healthy, model, requests served).
# Usage: bash scripts/status.sh [--run-dir DIR] [--json]   (see --help)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${IB_PYTHON:-$(bash "$root/scripts/venv.sh")/bin/python}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m scripts.status "$@"
