#!/usr/bin/env bash
# Create (once) and print the path of the project's virtual environment.
#
# The venv lives outside the checkout, keyed by a hash of the dependencies in pyproject.toml, so a fresh clone (CI) reuses it
# instead of reinstalling torch and transformers. Usage: VENV=$(bash scripts/venv.sh [extras]); extras
# default to "hf,dev". On a machine without an NVIDIA GPU torch is pinned to the 2.13.0 CPU build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-hf,dev}
python=${PYTHON:-python3}
cache=${IB_CACHE_DIR:-$HOME/.cache/inference-balancer}
# Only the dependency lists count: editing tool settings in pyproject.toml does not rebuild the venv.
deps=$("$python" -c 'import sys, tomllib, json; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([p["dependencies"], p["optional-dependencies"]], sort_keys=True))' "$root/pyproject.toml")
key=$( (echo "$deps"; echo "$extras"; "$python" --version) | sha256sum | cut -c1-12)
venv=${IB_VENV:-$cache/venv-$key}
mkdir -p "$(dirname "$venv")"
# One builder at a time: a second caller waits here instead of deleting a venv that is being built.
exec 9>"$venv.lock"
flock 9
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "[venv] creating $venv (extras: $extras); the first time this takes a few minutes" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
    torch_pin=()
    if ! command -v nvidia-smi >/dev/null 2>&1; then torch_pin=("torch==2.13.0"); fi
    "$venv/bin/pip" install -q "${torch_pin[@]}" "$root[$extras]" >&2
    "$venv/bin/pip" uninstall -q -y inference-balancer >&2 || true
    touch "$venv/.complete"
fi
# The checkout itself is used in place (PYTHONPATH), so one cached venv serves every clone.
echo "$venv"
