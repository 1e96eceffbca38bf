"""The job's connection file: wait until the balancer has every worker, then write and print how to connect.

Runs inside the batch job as `python3 -I slurm/connection.py wait-ready ...` and is read by the submit
script's `--wait`. Standard library only (lb/stats_client.py included), so it runs with the host's bare
`python3` even when the job's own Python lives in a container image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (`python3 -I slurm/connection.py`): find lb/ beside slurm/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lb.stats_client import fetch_stats

CONNECTION_FILE = "connection.json"
POLL_INTERVAL_S = 1.0


def connection_path(job_dir: Path) -> Path:
    return job_dir / CONNECTION_FILE


def read_connection(job_dir: Path) -> dict[str, Any] | None:
    """The job's connection record, or None while it is not written (or is being replaced)."""
    try:
        data = json.loads(connection_path(job_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_connection(job_dir: Path, record: dict[str, Any]) -> Path:
    """Write atomically (rename), so readers never see half a file."""
    path = connection_path(job_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def tunnel_command(record: dict[str, Any]) -> str:
    return f"ssh -N -L {record['local_port']}:{record['address']}:{record['port']} {record['login_host']}"


def instructions(record: dict[str, Any]) -> str:
    """What a user on their laptop runs: the tunnel, then the OpenAI SDK against it."""
    local = f"http://localhost:{record['local_port']}/v1"
    model = record.get("model") or "<model>"
    lines = [
        f"SLURM job {record['job_id']}: balancer on {record['node']} at {record['url']} "
        f"({record['healthy_workers']}/{record['expected_workers']} workers ready)",
        "From your laptop, open the tunnel:",
        f"  {tunnel_command(record)}",
        "then:",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{local}", api_key="unused")',
        f'  print(client.completions.create(model="{model}", prompt="Hello", max_tokens=16).choices[0].text)',
        f"Dashboard (through the same tunnel): http://localhost:{record['local_port']}/dashboard",
        f"Stop it with: scancel {record['job_id']}",
    ]
    return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(args: argparse.Namespace) -> int:
    """Poll /stats until `expect` workers are healthy; write the connection file either way (ready or not)."""
    job_dir = Path(args.job_dir)
    token_file = job_dir / "admin_token"
    token = token_file.read_text().strip() if token_file.exists() else None
    local_url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + args.timeout
    stats: dict[str, Any] | None = None
    while True:
        stats = fetch_stats(local_url, token) or stats
        healthy = int(stats.get("healthy_workers", 0)) if stats else 0
        if healthy >= args.expect:
            break
        dead = [pid for pid in args.watch_pid if not _alive(pid)]
        if dead:
            print(f"[connection] step process {dead} ended before the balancer was ready", file=sys.stderr)
            return 3
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    workers = (stats or {}).get("workers", [])
    record: dict[str, Any] = {
        "job_id": args.job_id,
        "node": args.node,
        "address": args.address,
        "port": args.port,
        "url": f"http://{args.address}:{args.port}",
        "login_host": args.login_host,
        "local_port": args.local_port,
        "ready": healthy >= args.expect,
        "expected_workers": args.expect,
        "healthy_workers": healthy,
        "workers": [w.get("url") for w in workers if isinstance(w, dict)],
        "model": _first_model(workers),
        "admin_token_file": str(token_file),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record["tunnel"] = tunnel_command(record)
    record["dashboard"] = f"http://localhost:{args.local_port}/dashboard"  # once the tunnel is open
    path = write_connection(job_dir, record)
    print(instructions(record), flush=True)
    print(f"(connection file: {path})", flush=True)
    return 0 if record["ready"] else 1


def _first_model(workers: list[Any]) -> str | None:
    for worker in workers:
        models = worker.get("models") if isinstance(worker, dict) else None
        if models:
            return str(models[0])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.connection", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ready = sub.add_parser("wait-ready", help="inside the job: wait for the workers, write connection.json")
    ready.add_argument("--job-dir", required=True, help="the job's directory (holds admin_token)")
    ready.add_argument("--job-id", required=True, help="SLURM job id")
    ready.add_argument("--node", required=True, help="node the balancer runs on")
    ready.add_argument("--address", required=True, help="address the balancer is reached at")
    ready.add_argument("--port", type=int, required=True, help="balancer port")
    ready.add_argument("--expect", type=int, required=True, help="workers that must be healthy")
    ready.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for them")
    ready.add_argument("--login-host", required=True, help="host for the printed ssh tunnel command")
    ready.add_argument("--local-port", type=int, default=8000, help="laptop port in the tunnel command")
    ready.add_argument("--watch-pid", type=int, action="append", default=[],
                       help="give up early when this process (an srun step) ends (repeatable)")
    show = sub.add_parser("show", help="print how to connect to a ready job")
    show.add_argument("job_dir", help="the job's directory")
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        return wait_ready(args)
    record = read_connection(Path(args.job_dir))
    if record is None:
        print(f"no {CONNECTION_FILE} in {args.job_dir} (job not ready, or stopped)", file=sys.stderr)
        return 1
    print(instructions(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
