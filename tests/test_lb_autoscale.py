"""The auto-scaling hook: a recording command is called with the desired worker count when the queue stays
long (one more) and when it stays empty with room to spare (one fewer), bounded, with a cool-down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from lb.autoscale import Autoscaler
from lb.backends import BackendPool
from lb.metrics import Metrics
from tests.conftest import SpawnFn
from tests.lb_cluster import Proc, start_worker, wait_until, workers_stats
from tests.lb_upstream import chat
from tests.processes import free_port, python_module

RECORDER = """import os, sys
with open(sys.argv[1], "a") as out:
    out.write(sys.argv[2] + " " + os.environ["IB_LB_SCALE_CURRENT"] + "\\n")
"""


def recorded(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_scale_command_is_called_with_one_more_then_one_fewer_worker(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    a, b = await upstreams(), await upstreams()
    url = await balancer(
        [a, b],
        max_inflight_per_worker=1,
        scale_command=f"{sys.executable} {script} {calls}",
        scale_min=1,
        scale_max=3,
        scale_window=0.3,
        scale_cooldown=1.5,
    )
    held = [
        asyncio.create_task(http.post(url + "/v1/chat/completions", json=chat(stream=True, hold=True)))
        for _ in range(3)
    ]  # 2 in flight (the caps), 1 queued
    for _ in range(100):
        if recorded(calls):
            break
        await asyncio.sleep(0.05)
    assert recorded(calls) == ["3 2"]  # desired 3, current 2
    a.release.set()
    b.release.set()
    for task in held:
        resp = await task
        await resp.read()
        resp.release()
    assert recorded(calls) == ["3 2"]  # the queue is empty now, but the cool-down holds the next decision
    for _ in range(100):
        if len(recorded(calls)) > 1:
            break
        await asyncio.sleep(0.05)
    assert recorded(calls) == ["3 2", "1 2"]  # empty queue, room to spare: one fewer
    down = 'lb_scale_decisions_total{direction="down",outcome="ok"} 1.0'
    for _ in range(40):  # counted once the command has exited
        async with http.get(url + "/metrics") as resp:
            metrics = await resp.text()
        if down in metrics:
            break
        await asyncio.sleep(0.05)
    assert down in metrics
    assert 'lb_scale_decisions_total{direction="up",outcome="ok"} 1.0' in metrics


def test_decisions_wait_for_the_window_and_respect_bounds_and_cooldown() -> None:
    pool = BackendPool()
    for i in range(2):
        pool.set_health(pool.add(f"http://127.0.0.1:{9300 + i}"), True)
    depth = [0]
    scaler = Autoscaler(
        "true", pool, lambda: depth[0], Metrics(pool, lambda: 0),
        minimum=2, maximum=3, up_queue=4, down_queue=0, window=10, cooldown=30, cap=2,
    )  # fmt: skip
    assert scaler.observe(0) is None  # empty queue, but already at the minimum
    assert scaler.observe(20) is None
    depth[0] = 5
    assert scaler.observe(21) is None  # above the threshold, not yet for the window
    assert scaler.observe(31) == (2, 3, "up")
    scaler.observe(32)
    assert scaler.observe(45) is None  # the queue held for the window again, but the cool-down runs to 61
    depth[0] = 0
    pool.set_health(pool.add("http://127.0.0.1:9302"), True)
    pool.backends[0].in_flight = 5  # more than 2 workers x cap 2: no room to remove one
    assert scaler.observe(62) is None and scaler.observe(80) is None
    pool.backends[0].in_flight = 1
    assert scaler.observe(81) is None
    assert scaler.observe(91) == (3, 2, "down")
    depth[0] = 9
    scaler.observe(130)
    pool.set_health(pool.add("http://127.0.0.1:9303"), True)  # 4 workers: at the maximum already
    assert scaler.observe(150) is None


async def test_scale_command_starts_a_worker_under_load_and_drains_it_after(
    spawn: SpawnFn, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The whole loop with real processes: queue pressure, the hook, scripts.scale starting and registering a
    fake worker that takes the queued request, then draining and stopping it when the queue stays empty."""
    seed = start_worker(spawn, "--fake-step-latency", "0.02")
    port = free_port()
    worker = f"{sys.executable} -m workers --engine fake --port {{port}} --max-wait-time 0"
    worker += " --fake-step-latency 0.02"
    scale = f"{sys.executable} -m scripts.scale --balancer http://127.0.0.1:{port} "
    scale += f"--state {tmp_path / 'scale.json'} --worker {shlex.quote(worker)}"
    lb = Proc(spawn(python_module(
        "lb", "--port", str(port), "--workers", seed.url, "--health-check-interval", "0.2",
        "--max-inflight-per-worker", "1", "--scale-command", scale, "--scale-min", "1", "--scale-max", "2",
        "--scale-window", "0.3", "--scale-cooldown", "1",
    ), name="lb"), port)  # fmt: skip
    lb.proc.wait_http_ok(lb.url + "/health")
    long = {"model": "fake-model", "prompt": "hi", "max_tokens": 600, "stream": True}  # 12 s of tokens
    state = tmp_path / "scale.json"
    try:
        first = await http.post(lb.url + "/v1/completions", json=long)
        # the second waits in the queue until the worker the hook starts has joined
        second = await http.post(lb.url + "/v1/completions", json={**long, "max_tokens": 5})
        assert (first.headers["X-LB-Worker"], second.headers["X-LB-Worker"]) == ("0", "1")
        rows = json.loads(state.read_text())
        assert len(rows) == 1 and workers_stats(lb)[1]["url"] == rows[0]["url"]
        await second.read()
        await first.read()
        wait_until(lambda: len(workers_stats(lb)) == 1, timeout=20)  # queue empty: drained and removed
        assert workers_stats(lb)[0]["url"] == seed.url
        wait_until(lambda: not psutil.pid_exists(rows[0]["pid"]), timeout=20)
    finally:  # workers the scale command started live in their own process groups: stop them here
        for row in json.loads(state.read_text()) if state.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(row["pgid"], signal.SIGKILL)
