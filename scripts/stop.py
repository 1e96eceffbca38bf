"""`python -m scripts.stop`: stop exactly what a launch recorded in its run directory, then check by pid.

A running launcher (`kind: cli`) is asked first (SIGTERM): it stops the balancer (draining), then the workers,
and removes cluster.json itself. If there is none, or it does not finish in time, this command renames
cluster.json to cluster.json.stopping (a supervising LocalCluster then stops restarting), stops the recorded
process groups itself in the same order, verifies that none of their processes is left, and removes the file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts import credentials, run_dir
from scripts.cluster_config import DEFAULT_RUN_DIR
from scripts.process_group import ProcessKey, alive, snapshot, stop_groups


def recorded_groups(entries: list[dict[str, Any]]) -> tuple[list[int], set[ProcessKey]]:
    """Process groups to signal and the processes in them; a group whose leader pid now belongs to another
    process (pid reuse: same pid, other start time) is left alone."""
    pgids, leaders = [], []
    for entry in entries:
        pid, created = entry.get("pid"), entry.get("create_time")
        if not pid:
            continue
        leader_alive = run_dir.process_alive(pid, None)
        if leader_alive and not run_dir.process_alive(pid, created):
            continue  # pid reused by an unrelated process
        pgids.append(int(entry.get("pgid") or pid))
        if leader_alive:
            leaders.append(int(pid))
    return pgids, snapshot(pgids, leaders)


def stop_launcher(launcher: dict[str, Any], timeout: float) -> bool:
    """SIGTERM a live CLI launcher and wait for it; True if it exited."""
    pid = launcher.get("pid")
    if launcher.get("kind") != "cli" or not pid or pid == os.getpid():
        return False
    if not run_dir.process_alive(pid, launcher.get("create_time")):
        return False
    print(f"asking the launcher (pid {pid}) to stop the cluster", flush=True)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not run_dir.process_alive(pid, launcher.get("create_time")):
            return True
        time.sleep(0.2)
    print(f"the launcher did not exit within {timeout:.0f} s; stopping its processes directly", flush=True)
    return False


def stop_recorded(path: Path, timeout: float, launcher_timeout: float) -> int:
    record = run_dir.read(path)
    lb = [record["lb"]] if record.get("lb") else []
    workers = list(record.get("workers", []))
    _, everything = recorded_groups(lb + workers)
    if stop_launcher(record.get("launcher") or {}, launcher_timeout):
        left = alive(everything)
        if not left:
            path.unlink(missing_ok=True)  # normally already removed by the launcher
            credentials.remove_files(path.parent)
            print(f"stopped: verified by pid, none of the {len(everything)} cluster processes is left")
            return 0
        print(f"the launcher exited but {len(left)} processes remain; stopping them", flush=True)
    stopping = path if path.name.endswith(run_dir.STOPPING_SUFFIX) else path.with_name(
        path.name + run_dir.STOPPING_SUFFIX)
    if path.exists() and path != stopping:
        os.replace(path, stopping)
    lb_groups, lb_keys = recorded_groups(lb)
    if lb_groups:
        print("stopping the balancer (it drains in-flight requests)", flush=True)
        stop_groups(lb_groups, lb_keys, timeout)
    worker_groups, worker_keys = recorded_groups(workers)
    if worker_groups:
        print(f"stopping {len(worker_groups)} workers", flush=True)
        stop_groups(worker_groups, worker_keys, timeout)
    left = alive(everything | lb_keys | worker_keys)
    if left:
        print(f"WARNING: still alive after SIGKILL: {[p.pid for p in left]}", file=sys.stderr)
        return 1
    stopping.unlink(missing_ok=True)
    credentials.remove_files(path.parent)
    print(f"stopped: verified by pid, none of the {len(everything | lb_keys | worker_keys)} cluster "
          "processes is left")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stop.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                        help="the launcher's --run-dir (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds each process group gets after SIGTERM before SIGKILL "
                             "(default: %(default)s)")
    parser.add_argument("--launcher-timeout", type=float, default=120.0,
                        help="seconds to wait for a running launcher to stop everything itself "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    path = run_dir.cluster_file(args.run_dir)
    if not path.exists() and path.with_name(path.name + run_dir.STOPPING_SUFFIX).exists():
        path = path.with_name(path.name + run_dir.STOPPING_SUFFIX)  # an earlier stop was interrupted
    try:
        return stop_recorded(path, args.timeout, args.launcher_timeout)
    except run_dir.RunDirError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
