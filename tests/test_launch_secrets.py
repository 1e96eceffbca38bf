"""The launcher keeps secrets secret: an admin token always (so loopback alone never grants admin), the key
and token in 0600 run-directory files, and neither on any command line, in the banner or in any log."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
from openai import OpenAI

from tests.launch_support import Launched
from tests.processes import free_port
from tests.processes import test_env as child_env

API_KEY = "sk-launch-SECRET-5151"


def post_worker(url: str, worker_url: str, token: str | None) -> int:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    body = json.dumps({"url": worker_url}).encode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url + "/workers", body, headers), timeout=10
        ) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_launch_keeps_key_and_admin_token_off_command_lines_banner_and_logs(
    launch: Callable[..., Launched],
) -> None:
    port = free_port()
    # the key reaches the launcher through its environment, so its own command line is clean too
    cluster = launch(
        "--engine", "fake", "--cpu-workers", "2", "--port", str(port), "--worker-base-port", str(free_port()),
        "--health-check-interval", "1", env=child_env(IB_CLUSTER_API_KEY=API_KEY),
    )  # fmt: skip
    record = cluster.wait_ready(timeout=120)
    token_file, key_file = cluster.run_dir / "admin-token", cluster.run_dir / "api-key"
    token = token_file.read_text().strip()
    for path in (token_file, key_file):
        assert path.stat().st_mode & 0o777 == 0o600
    banner = cluster.output()
    assert f"cat {key_file}" in banner and f"cat {token_file}" in banner

    lb_url = record["lb"]["url"]
    worker_url = record["workers"][0]["url"]
    assert post_worker(lb_url, worker_url, None) == 401  # loopback, but no token: refused
    assert post_worker(lb_url, worker_url, token) in (200, 201)
    client = OpenAI(base_url=lb_url + "/v1", api_key=key_file.read_text().strip(), max_retries=0)
    reply = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content

    processes = [psutil.Process(e["pid"]) for e in [record["launcher"], record["lb"], *record["workers"]]]
    command_lines = [" ".join(p.cmdline()) for p in processes for p in [p, *p.children(recursive=True)]]
    assert any("--admin-token-file" in line for line in command_lines)  # the balancer is among them
    for line in command_lines:
        assert API_KEY not in line and token not in line

    cluster.proc.stop(60)
    logs = [cluster.output(), *(path.read_text(errors="replace") for path in cluster.log_dir.glob("*.log"))]
    for text in logs:
        assert API_KEY not in text and token not in text
    assert not token_file.exists() and not key_file.exists()  # a clean stop removes them with cluster.json


def test_launch_reads_the_key_from_a_file_named_on_its_command_line(
    launch: Callable[..., Launched], tmp_path: Path
) -> None:
    key_file = tmp_path / "client-key"
    key_file.write_text(API_KEY + "\n")
    port = free_port()
    cluster = launch(
        "--engine", "fake", "--cpu-workers", "1", "--port", str(port), "--worker-base-port", str(free_port()),
        "--api-key-file", str(key_file),
    )  # fmt: skip
    record = cluster.wait_ready(timeout=120)
    client = OpenAI(base_url=record["lb"]["url"] + "/v1", api_key=API_KEY, max_retries=0)
    assert client.models.list().data[0].id == "fake-model"
    assert f"cat {key_file}" in cluster.output() and API_KEY not in cluster.output()
    assert key_file.exists()  # the user's own file stays
