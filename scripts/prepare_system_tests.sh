#!/usr/bin/env bash
# Install the Debian packages the system tests need (SLURM + munge, an SSH server and client, wrk, Chromium and
# its driver for the dashboard's browser tests), once.
#
# Run by scripts/test.sh before pytest. Quick and silent-ish when everything is already there; never fails the
# test run: without root or apt-get it says so and the SLURM / tunnel tests skip with their own reason.
set -uo pipefail
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
    echo "[prepare] missing ${missing[*]}; not root with apt-get, so not installing (SLURM/tunnel/browser tests will skip)"
    exit 0
fi
echo "[prepare] installing ${missing[*]}"
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp -t prepare-apt.XXXXXX)
if { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "[prepare] installed ${missing[*]} in $(( $(date +%s) - start )) s"
else
    echo "[prepare] apt-get failed for ${missing[*]} (SLURM/tunnel/browser tests will skip); last lines:"
    tail -n 15 "$log"
fi
rm -f "$log"
exit 0
