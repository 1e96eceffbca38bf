"""Fair share: while a batch saturates the workers, interactive requests are served ahead of it; two
concurrent batches advance at similar rates (round robin), whatever their sizes; and the batch input of
many users does not sit in the balancer's memory. Bounds are generous: this
checks the order of service, the figures belong to `python -m bench.batch`."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from tests.batch_support import MODEL, Cluster, jsonl, line, submit, wait_batch
from tests.processes import get_json

STEP = ("--fake-step-latency", "0.005")
UPLOAD_MB = 64  # 5 ms per decode step: a 20-token answer takes ~0.1 s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp: Path = tmp_path_factory.mktemp("batches-fair")
    cluster = Cluster(tmp, workers=2, worker_args=STEP)  # batch size 8 = --batch-max-inflight-per-worker
    yield cluster
    cluster.stop()


def interactive_latencies(client: openai.OpenAI, n: int) -> list[float]:
    took = []
    for i in range(n):
        started = time.perf_counter()
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"now {i}"}], max_tokens=20
        )
        took.append(time.perf_counter() - started)
    return took


def test_interactive_requests_are_served_ahead_of_a_saturating_batch(cluster: Cluster) -> None:
    client = cluster.client()
    idle = statistics.median(interactive_latencies(client, 8))
    batch_id = submit(client, jsonl([line(i, max_tokens=20) for i in range(600)]))
    wait_batch(client, batch_id, until=("in_progress",))
    time.sleep(0.3)  # the workers are full of batch lines
    busy = statistics.median(interactive_latencies(client, 8))
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "in_progress", "the batch ended before the interactive requests were measured"
    running = {b["id"]: b for b in get_json(cluster.url + "/stats")["batches"]}
    assert running[batch_id]["total"] == 600 and 0 < running[batch_id]["completed"] < 600
    # behind the batch's ~600 queued lines an interactive request would wait seconds; ahead of them it waits
    # at most for one decode slot of a busy worker
    assert busy < 3 * idle + 0.1, f"interactive p50 {busy:.3f}s with the batch vs {idle:.3f}s idle"
    client.batches.cancel(batch_id)
    wait_batch(client, batch_id)


def test_a_small_batch_submitted_later_is_not_starved_by_a_large_one(cluster: Cluster) -> None:
    client = cluster.client()
    large = submit(client, jsonl([line(f"L{i}", max_tokens=4) for i in range(1500)]))
    wait_batch(client, large, until=("in_progress",))
    time.sleep(0.3)
    started_large = client.batches.retrieve(large).request_counts.completed  # type: ignore[union-attr]
    small = wait_batch(client, submit(client, jsonl([line(f"S{i}", max_tokens=4) for i in range(150)])))
    large_done = client.batches.retrieve(large).request_counts.completed  # type: ignore[union-attr]
    assert small.status == "completed"
    progressed = large_done - started_large
    # round robin: while the small batch ran, the large one advanced at a similar rate (FIFO would give the
    # small batch nothing until the large one ended)
    assert client.batches.retrieve(large).status == "in_progress"
    assert 0.4 * 150 <= progressed <= 3 * 150, f"large batch did {progressed} lines while the small did 150"
    client.batches.cancel(large)
    wait_batch(client, large)


def test_an_upload_is_streamed_to_disk_not_held_in_memory(cluster: Cluster, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    one = json.dumps(line(0, padding="x" * 4000)).encode() + b"\n"
    with open(big, "wb") as out:
        for _ in range(UPLOAD_MB * 1024 * 1024 // len(one)):
            out.write(one)
    assert cluster.lb is not None
    lb = psutil.Process(cluster.lb.pid)
    before = lb.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, lb.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with open(big, "rb") as data:
            uploaded = cluster.client().files.create(file=("big.jsonl", data), purpose="batch")
    finally:
        stop.set()
        sampler.join()
    assert uploaded.bytes == big.stat().st_size
    assert peak - before < UPLOAD_MB * 1024 * 1024 / 4, f"the balancer grew {(peak - before) >> 20} MiB"
