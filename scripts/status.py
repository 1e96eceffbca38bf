"""`python -m scripts.status`: a table of the recorded cluster: worker, GPU, port, pid, alive, healthy, model,
requests served (the balancer's /stats) and restarts. Exit 0 if all healthy, 1 if not, 2 if no cluster."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from scripts import run_dir
from scripts.cluster_config import DEFAULT_RUN_DIR


def get_json(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    """(HTTP status, parsed body or None); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def collect(record: dict[str, Any]) -> dict[str, Any]:
    """Ask every recorded process for its health, and the balancer for per-worker counters."""
    lb = record.get("lb")
    served: dict[str, Any] = {}
    lb_row = None
    if lb:
        lb_probe = lb.get("probe_url", lb["url"])
        code, stats = get_json(lb_probe + "/stats")
        for entry in (stats or {}).get("workers", []) if isinstance(stats, dict) else []:
            served[str(entry.get("url", "")).rstrip("/")] = entry
        lb_row = {"name": "balancer", "url": lb["url"], "pid": lb["pid"], "port": lb["port"],
                  "alive": run_dir.process_alive(lb["pid"], lb.get("create_time")),
                  "healthy": get_json(lb_probe + "/health")[0] == 200,
                  "requests": (stats or {}).get("total_requests") if isinstance(stats, dict) else None,
                  "log": lb.get("log")}
    rows = []
    for worker in record["workers"]:
        probe = worker.get("probe_url", worker["url"]) + worker.get("health_path", "/health")
        code, health = get_json(probe)
        stat = served.get(worker["url"].rstrip("/"), {})
        model = (health or {}).get("model") if isinstance(health, dict) else None
        rows.append({"name": f"worker {worker['index']}", "index": worker["index"], "url": worker["url"],
                     "gpus": worker.get("gpus"), "port": worker["port"], "pid": worker["pid"],
                     "alive": run_dir.process_alive(worker["pid"], worker.get("create_time")),
                     "healthy": code == 200, "model": model or worker.get("model"),
                     "in_balancer": stat.get("healthy"), "requests": stat.get("requests_served"),
                     "restarts": worker.get("restarts", 0), "log": worker.get("log")})
    return {"workers": rows, "lb": lb_row, "started_at": record.get("started_at")}


def render(status: dict[str, Any]) -> str:
    header = ["worker", "GPU", "port", "pid", "alive", "healthy", "in lb", "model", "served", "restarts"]
    table = [header]
    yes = {True: "yes", False: "NO", None: "-"}
    for row in status["workers"]:
        table.append([str(row["index"]), row["gpus"] or "cpu", str(row["port"]), str(row["pid"]),
                      yes[row["alive"]], yes[row["healthy"]], yes[row["in_balancer"]], str(row["model"]),
                      "-" if row["requests"] is None else str(row["requests"]), str(row["restarts"])])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lb = status["lb"]
    if lb:
        served = "-" if lb["requests"] is None else lb["requests"]
        lines.insert(0, f"balancer {lb['url']}  pid {lb['pid']}  alive {yes[lb['alive']]}  healthy "
                        f"{yes[lb['healthy']]}  requests {served}")
    else:
        lines.insert(0, "no balancer (workers only)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="status.sh", description=__doc__)
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                        help="the launcher's --run-dir (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        record = run_dir.read(run_dir.cluster_file(args.run_dir))
    except run_dir.RunDirError as exc:
        print(exc, file=sys.stderr)
        return 2
    status = collect(record)
    print(json.dumps(status, indent=2) if args.json else render(status))
    rows = status["workers"] + ([status["lb"]] if status["lb"] else [])
    return 0 if all(r["healthy"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
