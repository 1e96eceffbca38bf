"""`python -m scripts.scale --balancer URL --state FILE --worker 'COMMAND {port}' N`: a scale command for the
balancer's auto-scaling hook (`--scale-command`) on one host.

The balancer runs its hook as `COMMAND N`, N being the worker count it wants. This brings the balancer's
healthy workers to N: it starts workers (`--worker`, with `{port}` replaced by a free port), each in its own
process group, waits for their /health, and registers them (POST /workers); or it drains and removes the
workers it started itself (DELETE /workers/{index}, then SIGTERM to their group, SIGKILL after a grace
period), newest first. Workers it did not start (the launcher's, another host's) are never stopped. What it
started is kept in the `--state` JSON file, by pid, process group and start time, never by name.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from lb.stats import fetch_stats
from scripts.ports import port_is_free
from scripts.registration import RegistrationError, register_worker


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--balancer", required=True, help="the balancer's base URL")
    parser.add_argument(
        "--state", required=True, type=Path, help="JSON file of the workers this command started"
    )
    parser.add_argument("--worker", required=True, help="command starting one worker; {port} is replaced")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the workers listen on and are reached at"
    )
    parser.add_argument("--admin-token-file", type=Path, help="file whose first line is the admin token")
    parser.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds a worker may take to start"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=30.0, help="seconds after SIGTERM before SIGKILL"
    )
    parser.add_argument("desired", type=int, help="workers wanted (the balancer's hook appends it)")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(f"[scale] {message}", flush=True)


def load_state(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if _alive(r)] if isinstance(rows, list) else []


def save_state(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def _alive(row: dict[str, Any]) -> bool:
    """The same process we started (pid and start time), still running."""
    try:
        proc = psutil.Process(row["pid"])
        return abs(proc.create_time() - row["started"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


def free_port(host: str) -> int:
    for port in range(20000 + os.getpid() % 20000, 65000):
        if port_is_free(host, port):
            return port
    raise RuntimeError("no free port")


def start_worker(args: argparse.Namespace, token: str | None, log_dir: Path) -> dict[str, Any]:
    port = free_port(args.host)
    argv = shlex.split(args.worker.replace("{port}", str(port)))
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"worker-{port}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{args.host}:{port}"
    row = {"pid": proc.pid, "pgid": proc.pid, "port": port, "url": url,
           "started": psutil.Process(proc.pid).create_time()}  # fmt: skip
    deadline = time.monotonic() + args.startup_timeout
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(row, args.stop_timeout)
            raise RuntimeError(f"worker on port {port} did not become healthy (log: {log_dir})")
        time.sleep(0.2)
    register_worker(args.balancer, url, token, time.monotonic() + 30)
    say(f"started and registered {url} (pid {proc.pid})")
    return row


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def remove_worker(
    args: argparse.Namespace, token: str | None, row: dict[str, Any], index: int | None
) -> None:
    if index is not None:
        request = urllib.request.Request(f"{args.balancer.rstrip('/')}/workers/{index}", method="DELETE")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:  # drains: the balancer answers once the worker's requests finished (or its drain timed out)
            with urllib.request.urlopen(request, timeout=args.stop_timeout + 60):
                pass
        except (urllib.error.URLError, OSError) as exc:
            say(f"could not remove {row['url']} from the balancer: {exc}")
    _stop(row, args.stop_timeout)
    say(f"drained and stopped {row['url']} (pid {row['pid']})")


def _stop(row: dict[str, Any], timeout: float) -> None:
    if not _alive(row):
        return
    os.killpg(row["pgid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(row) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(row):
        os.killpg(row["pgid"], signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = None
    if args.admin_token_file:
        token = args.admin_token_file.read_text().splitlines()[0].strip()
    stats = fetch_stats(args.balancer, token)
    if stats is None:
        say(f"no balancer answers at {args.balancer}")
        return 1
    workers = [w for w in stats["workers"] if w.get("healthy")]
    rows = load_state(args.state)
    current = len(workers)
    say(f"{current} healthy worker(s), {args.desired} wanted; {len(rows)} started by this command")
    log_dir = args.state.parent / "scale-logs"
    try:
        while current < args.desired:
            rows.append(start_worker(args, token, log_dir))
            save_state(args.state, rows)
            current += 1
        indexes = {w["url"]: w["index"] for w in stats["workers"]}
        while current > args.desired and rows:
            row = rows.pop()
            remove_worker(args, token, row, indexes.get(row["url"]))
            save_state(args.state, rows)
            current -= 1
    except (RuntimeError, RegistrationError) as exc:
        say(str(exc))
        return 1
    if current > args.desired:
        say(f"{current} workers remain: the others were not started by this command, so they stay")
    return 0


if __name__ == "__main__":
    sys.exit(main())
