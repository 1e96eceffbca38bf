#!/usr/bin/env bash
# One SLURM node task (srun --ntasks-per-node=1): start a worker per GPU SLURM gave this node and register each
# with the balancer on the first node, through the launcher's workers-only mode (it also restarts crashed workers).
#
# Reads the IB_JOB_* environment described in slurm/multi_gpu_job.sbatch, plus what SLURM sets: SLURM_NODEID,
# SLURMD_NODENAME and CUDA_VISIBLE_DEVICES (the GPUs of this node's allocation, e.g. "0,1").
set -euo pipefail
node_id=${SLURM_NODEID:-0}
node_name=${SLURMD_NODENAME:-$(hostname -s)}
node_dir="$IB_JOB_DIR/node-$node_id"
mkdir -p "$node_dir"
exec >>"$node_dir/task.log" 2>&1
log() { echo "[node $node_id $node_name $(date -u +%H:%M:%S)] $*"; }

addr=${IB_JOB_NODE_ADDR:-$(bash "$IB_JOB_REPO/slurm/node_addr.sh")}
# Distinct ports per node, so that simulated nodes sharing one host never collide.
base_port=$((IB_JOB_WORKER_BASE_PORT + IB_JOB_NODE_PORT_STRIDE * node_id))

if [ "${IB_JOB_CPU_WORKERS:-0}" -gt 0 ]; then
    placement=(--cpu-workers "$IB_JOB_CPU_WORKERS")
    log "$IB_JOB_CPU_WORKERS CPU workers"
else
    if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
        log "error: SLURM set no CUDA_VISIBLE_DEVICES on this node (is --gres=gpu configured?)"
        exit 2
    fi
    placement=(--gpu-ids "$CUDA_VISIBLE_DEVICES")
    log "GPUs $CUDA_VISIBLE_DEVICES"
fi
engine_args=()
if [ -n "${IB_JOB_ENGINE_ARGS:-}" ]; then engine_args=("--engine-args=$IB_JOB_ENGINE_ARGS"); fi
model=()
if [ -n "${IB_JOB_MODEL_PATH:-}" ]; then model=(--model-path "$IB_JOB_MODEL_PATH"); fi

# The admin token arrives as IB_CLUSTER_ADMIN_TOKEN (environment, not argv). On scancel SLURM signals every
# process of the step (this shell, the launcher, its workers) at once; the trap only logs and waits for the
# launcher to finish stopping its workers (a second SIGTERM from us could cut its shutdown short).
log "workers on $addr from port $base_port, registering with $IB_JOB_REGISTER_URL"
"$IB_JOB_PYTHON" -m scripts.launch --workers-only --register-with "$IB_JOB_REGISTER_URL" \
    "${placement[@]}" "${model[@]}" --engine "$IB_JOB_ENGINE" "${engine_args[@]}" \
    --batch-size "$IB_JOB_BATCH_SIZE" --max-wait-time "$IB_JOB_MAX_WAIT_TIME" \
    --worker-host "$addr" --worker-base-port "$base_port" \
    --log-dir "$node_dir" --run-dir "$node_dir" &
launcher_pid=$!
trap 'log "signalled: the launcher stops its workers"' TERM INT
status=0
wait "$launcher_pid" || status=$?
if [ "$status" -gt 128 ]; then
    # A trapped signal ended `wait` early: wait again for the launcher to finish stopping its workers.
    status=0
    wait "$launcher_pid" || status=$?
fi
log "launcher exited with $status"
exit "$status"
