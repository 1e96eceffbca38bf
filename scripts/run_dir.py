"""The run directory: `cluster.json` records what a launch started (pids, process groups, ports, GPUs, logs).

Shape (DESIGN.md, extended with `launcher`, `create_time` and `url` so stop/status never act on a reused pid):
`{"version": 1, "started_at", "launcher": {"pid", "create_time", "kind": "cli"|"api"},
  "lb": {"pid", "pgid", "create_time", "port", "url", "log"} | null,
  "workers": [{"index", "pid", "pgid", "create_time", "port", "url", "gpus", "engine", "model", "log",
               "restarts"}]}`.
Written atomically (temp file + rename) on start and on every restart, removed on a clean stop.
`stop` first renames it to `cluster.json.stopping`, which tells a supervising launcher to stop restarting.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import psutil

FILE_NAME = "cluster.json"
STOPPING_SUFFIX = ".stopping"


class RunDirError(RuntimeError):
    """The run directory is missing, unreadable, or already holds a live cluster."""


def resolve(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve()


def cluster_file(run_dir: str | Path) -> Path:
    return resolve(run_dir) / FILE_NAME


def write_atomic(path: Path, record: dict[str, Any]) -> None:
    """Readers see either the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"no cluster is recorded in {path.parent} ({path.name} not found)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "workers" not in data:
        raise RunDirError(f"{path} is not a cluster record")
    return data


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """True if `pid` runs and is the same process we recorded (same start time), not a zombie."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def refuse_if_live(path: Path) -> None:
    """A second launch into the same run directory would hide the first one from status and stop."""
    if not path.exists():
        return
    try:
        record = read(path)
    except RunDirError:
        return  # unreadable leftovers are overwritten
    launcher = record.get("launcher") or {}
    if process_alive(launcher.get("pid"), launcher.get("create_time")):
        raise RunDirError(f"{path} belongs to a running launcher (pid {launcher.get('pid')}); stop it with "
                          f"scripts/stop.sh --run-dir {path.parent}, or pass another --run-dir")


def process_info(pid: int) -> dict[str, Any]:
    """pid, pgid and start time of a process we just started."""
    try:
        proc = psutil.Process(pid)
        return {"pid": pid, "pgid": os.getpgid(pid), "create_time": proc.create_time()}
    except (psutil.Error, ProcessLookupError):
        return {"pid": pid, "pgid": pid, "create_time": None}
