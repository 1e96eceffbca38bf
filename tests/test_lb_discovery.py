"""--discover: the balancer finds fake-engine workers started on ports of a range, skips the listed ports,
routes to what it found, and forgets a killed worker after the health thresholds (real processes)."""

from __future__ import annotations

import signal
import socket

import pytest

from lb.discovery import parse_ranges
from lb.settings import ConfigError
from tests.conftest import SpawnFn
from tests.lb_cluster import post_json, start_lb, start_worker, wait_until, workers_stats
from tests.processes import free_port

SPAN = 40  # ports in the scanned range


def free_range() -> int:
    """A base port whose next SPAN ports were free a moment ago."""
    for _ in range(50):
        base = free_port()
        if base + SPAN > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + SPAN):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free range of ports")


def test_discovery_finds_workers_in_a_range_and_forgets_killed_ones(spawn: SpawnFn) -> None:
    base = free_range()
    found_a, skipped, found_b = base + 3, base + 11, base + 29
    workers = {port: start_worker(spawn, port=port, wait=False) for port in (found_a, skipped, found_b)}
    for worker in workers.values():
        worker.proc.wait_http_ok(worker.url + "/health")
    lb = start_lb(
        spawn,
        [],
        "--discover",
        f"127.0.0.1:{base}-{base + SPAN - 1}",
        "--discover-skip-ports",
        f"{skipped},{base + 35}-{base + 39}",
        "--discover-interval",
        "0.3",
        "--unhealthy-threshold",
        "2",
    )
    expected = {f"http://127.0.0.1:{found_a}", f"http://127.0.0.1:{found_b}"}
    wait_until(lambda: {w["url"] for w in workers_stats(lb)} == expected, timeout=20)
    assert all(w["discovered"] and w["healthy"] for w in workers_stats(lb))
    for _ in range(4):  # they take traffic
        status, body = post_json(
            lb.url + "/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200, body
    assert sum(w["requests_served"] for w in workers_stats(lb)) == 4
    workers[found_a].proc.signal(signal.SIGKILL)
    wait_until(lambda: {w["url"] for w in workers_stats(lb)} == {f"http://127.0.0.1:{found_b}"}, timeout=20)
    assert f":{skipped}" not in str(workers_stats(lb))


@pytest.mark.parametrize(
    ("spec", "skip", "message"),
    [("127.0.0.1", (), "HOST:PORT"), ("h:9-5", (), "low first"), ("h:1-2", ("x",), "PORT or PORT-PORT")],
)
def test_bad_discover_ranges_are_refused_naming_the_setting(
    spec: str, skip: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_ranges([spec], skip)


def test_skipped_ports_are_left_out() -> None:
    assert parse_ranges(["h:5002", "h:5005-5010"], ["5007", "5009-5010"]) == [
        ("h", [5002]),
        ("h", [5005, 5006, 5008]),
    ]
