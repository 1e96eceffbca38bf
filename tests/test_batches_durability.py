"""A batch survives the death of the balancer (SIGKILL, restart on the same --data-dir) and of a worker:
it completes and every custom_id appears exactly once across the output and error files."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import openai

from tests.batch_support import Cluster, all_records, jsonl, line, submit, wait_batch

LINES = 2000
SLOW = ("--fake-step-latency", "0.002")  # ~10 ms a line: the batch runs for a few seconds


def wait_completed(client: openai.OpenAI, batch_id: str, count: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        counts = client.batches.retrieve(batch_id).request_counts
        done = counts.completed + counts.failed if counts else 0
        if done >= count:
            return done
        assert time.monotonic() < deadline, f"only {done} lines done after {timeout}s"
        time.sleep(0.05)


def results_on_disk(cluster: Cluster, input_file_id: str) -> int:
    """Complete result lines written to the data directory (every JSONL file but the input)."""
    files = [p for p in (cluster.data_dir / "files").glob("*.jsonl") if p.stem != input_file_id]
    return sum(p.read_bytes().count(b"\n") for p in files)


def assert_exactly_once(client: openai.OpenAI, batch_id: str, lines: int = LINES) -> list[dict[str, object]]:
    batch = wait_batch(client, batch_id, timeout=120)
    assert batch.status == "completed"
    found = all_records(client, batch)
    repeated = [cid for cid, n in Counter(r["custom_id"] for r in found).items() if n > 1]
    assert not repeated, f"custom_ids with more than one result: {repeated[:5]}"
    assert {r["custom_id"] for r in found} == {f"req-{i}" for i in range(lines)}
    assert batch.request_counts.completed + batch.request_counts.failed == lines
    return found


def test_balancer_killed_mid_batch_resumes_and_sends_only_unfinished_lines(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, workers=2, worker_args=SLOW)
    try:
        client = cluster.client()
        batch_id = submit(client, jsonl([line(i) for i in range(LINES)]))
        input_file_id = client.batches.retrieve(batch_id).input_file_id
        wait_completed(client, batch_id, LINES // 4)
        assert cluster.lb is not None
        cluster.lb.signal(signal.SIGKILL)
        cluster.lb.popen.wait(10)
        on_disk = results_on_disk(cluster, input_file_id)
        sent_before_restart = cluster.received()
        assert sent_before_restart < LINES  # killed in the middle
        cluster.start_lb()
        client = cluster.client()
        found = assert_exactly_once(client, batch_id)
        assert all(r["response"]["status_code"] == 200 for r in found)  # type: ignore[index]
        resent = cluster.received() - sent_before_restart
        # only the lines without a result on disk were sent again (the worker may still have finished some
        # of the 16 that were in flight at the kill after we counted)
        assert 0 <= resent - (LINES - on_disk) <= 16
        assert "resuming batch " + batch_id in (tmp_path / "lb-2.log").read_text()
    finally:
        cluster.stop()


def test_worker_killed_mid_batch_its_lines_are_retried_on_the_others(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, workers=3, worker_args=SLOW)
    try:
        client = cluster.client()
        batch_id = submit(client, jsonl([line(i) for i in range(LINES)]))
        wait_completed(client, batch_id, LINES // 4)
        victim, _ = cluster.workers[0]
        victim.signal(signal.SIGKILL)
        found = assert_exactly_once(client, batch_id)
        assert all(r["response"]["status_code"] == 200 for r in found)  # type: ignore[index]
        assert "retrying /v1/chat/completions on another worker" in (tmp_path / "lb-1.log").read_text()
    finally:
        cluster.stop()


def test_sigterm_mid_batch_stops_dispatch_drains_quickly_and_the_batch_resumes(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, workers=1, worker_args=SLOW, lb_args=("--drain-timeout", "30"))
    try:
        client = cluster.client()
        batch_id = submit(client, jsonl([line(i) for i in range(600)]))
        wait_completed(client, batch_id, 100)
        assert cluster.lb is not None
        started = time.monotonic()
        cluster.lb.signal(signal.SIGTERM)
        assert cluster.lb.popen.wait(20) == 0
        # the drain waited for the lines on the worker only, not for the rest of the batch
        assert time.monotonic() - started < 10
        assert cluster.received() < 500, "the batch kept dispatching while the balancer drained"
        cluster.start_lb()
        found = assert_exactly_once(cluster.client(), batch_id, 600)
        assert all(r["response"]["status_code"] == 200 for r in found)  # type: ignore[index]
    finally:
        cluster.stop()
