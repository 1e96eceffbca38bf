#!/usr/bin/env bash
# Install the Debian packages the system tests need (SLURM + munge, an SSH server and client, wrk, Chromium and
# its driver for the dashboard's browser tests), once.
#
# Run by scripts/test.sh before pytest. Quick and silent-ish when everything is already there. Locally it never
# fails the test run: without root or apt-get it says so and the SLURM / tunnel / browser tests skip with their
# own reason. With CI=true it fails loudly (exit 1) instead, since CI must not pass without the system tier.
set -uo pipefail
give_up() {
    echo "[prepare] $1" >&2
    if [ "${CI:-}" = true ]; then
        echo "[prepare] ERROR: CI=true and the system tests' packages are missing: failing the run" >&2
        exit 1
    fi
    exit 0
}
# command that proves each package is present -> package name
declare -A probes=(
    [slurmctld]=slurm-wlm
    [munged]=munge
    [sshd]=openssh-server
    [ssh]=openssh-client
    [wrk]=wrk
    [chromium]=chromium
    [chromedriver]=chromium-driver
)
missing=()
for cmd in "${!probes[@]}"; do
    # sshd lives in /usr/sbin, which is not always on a non-root PATH
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        missing+=("${probes[$cmd]}")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "[prepare] system packages present (slurm-wlm munge openssh-server openssh-client wrk chromium chromium-driver)"
    exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    give_up "missing ${missing[*]}; not root with apt-get, so not installing (SLURM/tunnel/browser tests will skip)"
fi
echo "[prepare] installing ${missing[*]}"
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp -t prepare-apt.XXXXXX)
if { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "[prepare] installed ${missing[*]} in $(( $(date +%s) - start )) s"
else
    tail -n 15 "$log" >&2
    rm -f "$log"
    give_up "apt-get failed for ${missing[*]} (SLURM/tunnel/browser tests will skip); its last lines are above"
fi
rm -f "$log"
exit 0
