"""The dashboard in headless Chromium against a real balancer and real worker processes.

One cluster and one browser for the whole module (three fake-engine workers, one address that accepts
connections and never answers, a balancer with an admin token); the tests run in file order and each leaves
the cluster as it found it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.browser import chromium_paths, start_chromium
from tests.batch_support import jsonl, line, submit, wait_batch
from tests.lb_cluster import FAST
from tests.processes import ManagedProcess, free_port, get_json, python_module

pytestmark = pytest.mark.system

ADMIN_TOKEN = "dashboard-test-token"
WAIT_S = 20.0


@dataclass
class Cluster:
    url: str
    workers: list[ManagedProcess]
    worker_ports: list[int]
    log_dir: Path
    started: list[ManagedProcess]

    def start_worker(self, port: int) -> ManagedProcess:
        proc = ManagedProcess(
            python_module(
                "workers",
                "--engine",
                "fake",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *FAST,
                "--fake-step-latency",
                "0.01",  # a batch then runs for seconds: long enough to watch its bar
            ),
            self.log_dir / f"worker-{port}-{len(self.started)}.log",
        )
        self.started.append(proc)
        return proc

    def stats(self) -> list[dict[str, Any]]:
        return list(get_json(self.url + "/stats")["workers"])


class HungServer:
    """Accepts TCP connections and never answers a byte: a worker stuck in a driver call."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if chromium_paths() is None:
        message = (
            "chromium and chromium-driver are not installed (scripts/prepare_system_tests.sh installs them)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    log_dir = tmp_path_factory.mktemp("dashboard")
    hung = HungServer()
    ports = [free_port() for _ in range(3)]
    c = Cluster("", [], ports, log_dir, [])
    try:
        c.workers = [c.start_worker(port) for port in ports]
        for proc, port in zip(c.workers, ports, strict=True):
            proc.wait_http_ok(f"http://127.0.0.1:{port}/health")
        lb_port = free_port()
        urls = [f"http://127.0.0.1:{p}" for p in ports] + [f"http://127.0.0.1:{hung.port}"]
        lb = ManagedProcess(
            python_module(
                "lb",
                "--port",
                str(lb_port),
                "--workers",
                ",".join(urls),
                "--admin-token",
                ADMIN_TOKEN,
                "--health-check-interval",
                "0.3",
                "--health-check-timeout",
                "0.5",
                "--unhealthy-threshold",
                "2",
                "--healthy-threshold",
                "1",
                "--telemetry-interval",
                "0.5",
                "--data-dir",
                str(log_dir / "data"),  # its own database: batches of other runs never show up here
                "--log-file",
                f"balancer={log_dir / 'lb.log'}",
            ),
            log_dir / "lb.log",
        )
        c.started.append(lb)
        c.url = f"http://127.0.0.1:{lb_port}"
        lb.wait_http_ok(c.url + "/health")
        yield c
    finally:
        for proc in reversed(c.started):
            proc.stop()
        hung.close()


@pytest.fixture(scope="module")
def page(cluster: Cluster) -> Iterator[Any]:
    chrome = start_chromium()
    try:
        chrome.get(cluster.url + "/dashboard")
        yield chrome
    finally:
        chrome.quit()


def wait_for(predicate: Any, timeout: float = WAIT_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.1)


def row_states(page: Any) -> dict[str, str]:
    rows = page.find_elements("css selector", "#workers tbody tr")
    return {row.get_attribute("data-worker"): row.get_attribute("data-state") for row in rows}


def set_token(page: Any, token: str) -> None:
    field = page.find_element("css selector", "#admin-token")
    field.clear()
    if token:
        field.send_keys(token)


def click(page: Any, action: str, worker: int) -> None:
    page.find_element("css selector", f'button[data-action="{action}"][data-worker="{worker}"]').click()


def test_one_row_per_worker_in_its_state(page: Any) -> None:
    expected = {"0": "healthy", "1": "healthy", "2": "healthy", "3": "down"}  # 3 accepts and never answers
    wait_for(lambda: row_states(page) == expected, what=f"rows {expected}")
    model = page.find_element("css selector", '#workers tr[data-worker="0"] td.model').text
    assert model == "fake-model"


def test_cluster_and_page_answer_fast_while_a_worker_hangs(cluster: Cluster) -> None:
    for path in ["/cluster", "/dashboard"] * 3:
        started = time.monotonic()
        get = get_json if path == "/cluster" else _get_text
        get(cluster.url + path)
        assert time.monotonic() - started < 0.2, path


def _get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_admin_button_without_token_shows_the_refusal(page: Any, cluster: Cluster) -> None:
    set_token(page, "")
    click(page, "drain", 0)
    notice = page.find_element("css selector", "#notice")
    wait_for(lambda: "401" in notice.text, what="a 401 on the page")
    assert "admin token" in notice.text
    assert cluster.stats()[0]["draining"] is False


def test_drain_button_marks_the_worker_draining_and_readmit_undoes_it(page: Any, cluster: Cluster) -> None:
    set_token(page, ADMIN_TOKEN)
    click(page, "drain", 1)
    wait_for(lambda: cluster.stats()[1]["draining"], what="worker 1 draining in /stats")
    wait_for(lambda: row_states(page).get("1") == "draining", what="row 1 draining")
    click(page, "readmit", 1)
    wait_for(lambda: not cluster.stats()[1]["draining"], what="worker 1 re-admitted in /stats")
    wait_for(lambda: row_states(page).get("1") == "healthy", what="row 1 healthy again")


def test_sigkilled_worker_turns_down_then_healthy_after_restart(page: Any, cluster: Cluster) -> None:
    cluster.workers[2].signal(signal.SIGKILL)
    wait_for(lambda: row_states(page).get("2") == "down", what="row 2 down")
    port = cluster.worker_ports[2]
    restarted = cluster.start_worker(port)
    restarted.wait_http_ok(f"http://127.0.0.1:{port}/health")
    cluster.workers[2] = restarted
    wait_for(lambda: row_states(page).get("2") == "healthy", what="row 2 healthy after restart")


def test_playground_shows_a_streamed_reply(page: Any) -> None:
    page.find_element("css selector", "#pg-send").click()
    status = page.find_element("css selector", "#pg-status")
    wait_for(lambda: status.text.startswith("done"), what=f"the reply to finish ({status.text})")
    output = page.find_element("css selector", "#pg-output").text
    chunks = int(status.text.split()[1])
    assert len(output.split()) >= 8 and chunks > 1  # the page read several SSE deltas, not one body


def test_running_batch_shows_a_progress_bar_with_eta(page: Any, cluster: Cluster) -> None:
    sdk = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
    batch_id = submit(sdk, jsonl([line(i, max_tokens=48) for i in range(300)]))
    row = f'#jobs .job[data-job="{batch_id}"]'
    wait_for(lambda: page.find_elements("css selector", row), what="the batch's bar")
    bar = page.find_element("css selector", row + " .bar > div")
    wait_for(
        lambda: float(bar.value_of_css_property("width").removesuffix("px")) > 0, what="a bar that moved"
    )
    wait_for(lambda: "ETA" in page.find_element("css selector", row + " .eta").text, what="an ETA")
    done = wait_batch(sdk, batch_id, timeout=60)
    assert done.status == "completed"
    wait_for(lambda: not page.find_elements("css selector", row), what="the finished batch's bar to go")


def test_logs_section_shows_the_balancer_log_with_the_token(page: Any, cluster: Cluster) -> None:
    set_token(page, ADMIN_TOKEN)
    page.find_element("css selector", "#admin-token").send_keys("\n")  # change event: list the logs
    wait_for(
        lambda: page.find_elements("css selector", '#log-name option[value="balancer"]'), what="log names"
    )
    page.find_element("css selector", "#log-show").click()
    output = page.find_element("css selector", "#log-output")
    wait_for(lambda: "listening on" in output.text, what="the balancer's log on the page")
