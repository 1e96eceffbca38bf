"""`python -m scripts.launch`: start workers and the balancer, say how to use them, stop all on Ctrl-C/TERM.

Exit codes: 0 clean stop, 1 launch failed (the failing worker's log tail is printed), 2 bad configuration,
130 interrupted during start-up. Used by start_multi_gpu_server.sh and, with --workers-only
--register-with URL, by the SLURM node tasks.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from types import FrameType

import psutil

from lb.settings import ConfigError
from scripts.cluster import LaunchError, LocalCluster
from scripts.cluster_config import load_cluster_config
from scripts.registration import RegistrationError
from scripts.run_dir import RunDirError


def say(message: str) -> None:
    print(f"[launcher {time.strftime('%H:%M:%S')}] {message}", flush=True)


def served_model(url: str, api_key: str | None) -> str | None:
    """The first model id the balancer lists, for the usage example."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers),
                                    timeout=5) as resp:
            data = json.load(resp)
        return str(data["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def live_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.Error:
            continue  # exited between listing and asking
    return alive


def ready_banner(cluster: LocalCluster) -> str:
    cfg = cluster.config
    lines = []
    if cfg.workers_only:
        lines.append(f"workers ready (no balancer): {', '.join(cluster.worker_urls)}")
    else:
        creds = cluster.credentials
        key_file = creds.api_key_file if creds is not None else None
        key = creds.api_key if creds is not None else None
        model = cfg.served_model_name or served_model(cluster.url, key) or cfg.model_path or "MODEL"
        # the banner names the files, never the secrets: it lands in terminals, logs and CI output
        api_key = f'open("{key_file}").read().strip()' if key_file is not None else '"none"'
        lines += [
            f"READY: balancer at {cluster.url} in front of {len(cluster.workers)} workers",
            *([f"API key: cat {key_file}"] if key_file is not None else []),
            *([f"admin token (POST/DELETE /workers): cat {creds.admin_token_file}"] if creds else []),
            "OpenAI SDK example:",
            f'  from openai import OpenAI; client = OpenAI(base_url="{cluster.openai_base_url}", '
            f"api_key={api_key})",
            f'  print(client.chat.completions.create(model="{model}", messages=[{{"role": "user", '
            f'"content": "Hello"}}]).choices[0].message.content)',
            f"Dashboard (workers, GPUs, live charts, playground): {cluster.url}/dashboard",
        ]
    run_dir = cluster.run_file.parent
    lines.append(f"status: scripts/status.sh --run-dir {run_dir}   stop: Ctrl-C or scripts/stop.sh --run-dir "
                 f"{run_dir}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_cluster_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop_requested = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop_requested.is_set():
            return  # a second Ctrl-C must not interrupt the orderly stop already under way
        stop_requested.set()
        if cluster.supervisor is not None:
            cluster.supervisor.policy.enabled = False  # workers SIGTERMed with us (scancel) stay down
        say(f"{signal.Signals(signum).name} received: stopping")
        if starting:
            raise KeyboardInterrupt  # unwinds start(), which stops whatever it had started

    cluster = LocalCluster(config=config, report=say, launcher_kind="cli")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
    except KeyboardInterrupt:
        cluster.stop()  # no-op when start() already cleaned up; needed if the signal came just after it
        say("interrupted during start-up; everything started so far was stopped")
        return 130
    except (LaunchError, RegistrationError) as exc:
        print(f"error: launch failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except (ConfigError, RunDirError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ConfigError) else 1
    finally:
        starting = False
    print(ready_banner(cluster), flush=True)
    while not stop_requested.wait(1.0):
        if cluster.stopped_from_outside:
            say("the run file was removed from outside: stopping")
            break
    report = cluster.stop()
    # The seed's debug check, always on: the launcher itself must have no child process left either.
    children = live_children()
    if children:
        say(f"WARNING: child processes still running: {[c.pid for c in children]}")
    else:
        say("the launcher has no child process left")
    return 0 if not report.left and not children else 1


if __name__ == "__main__":
    sys.exit(main())
