"""Balancer units without sockets: policies, pool accounting, model matching, config, the admission queue."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from lb.admission import Admission
from lb.auth import check_bearer
from lb.backends import BackendPool
from lb.config import BalancerConfig, load
from lb.errors import ModelNotFound, NoHealthyBackend, QueueFull, Unauthorized
from lb.model_routing import ModelRouter, normalise
from lb.policies import POLICIES, LeastConnections, PowerOfTwo, RoundRobin, Tuning
from lb.settings import ConfigError, from_mapping


def healthy_pool(n: int, models: list[frozenset[str]] | None = None) -> BackendPool:
    pool = BackendPool()
    for i in range(n):
        backend = pool.add(f"http://127.0.0.1:{9000 + i}", models[i] if models else frozenset())
        pool.set_health(backend, True)
    return pool


def test_round_robin_is_strict_rotation() -> None:
    pool = healthy_pool(4)
    policy = RoundRobin()
    picks = Counter(policy.choose(pool.routable).index for _ in range(400))
    assert picks == {0: 100, 1: 100, 2: 100, 3: 100}


def test_least_connections_prefers_idle_backend() -> None:
    pool = healthy_pool(3)
    pool.backends[0].in_flight = 5
    pool.backends[2].in_flight = 1
    assert LeastConnections().choose(pool.routable).index == 1


def test_least_connections_spreads_ties() -> None:
    pool = healthy_pool(3)
    policy = LeastConnections()
    assert {policy.choose(pool.routable).index for _ in range(3)} == {0, 1, 2}


def test_power_of_two_never_picks_the_busier_of_its_pair() -> None:
    pool = healthy_pool(2)
    pool.backends[0].in_flight = 3
    policy = PowerOfTwo(Tuning(rng=random.Random(0)))
    assert all(policy.choose(pool.routable).index == 1 for _ in range(50))


def test_policies_registry_names_match_config_choices() -> None:
    from lb.config import POLICY_NAMES

    assert set(POLICIES) == set(POLICY_NAMES)


async def test_track_releases_on_error_and_cancellation() -> None:
    pool = healthy_pool(1)
    backend = pool.backends[0]
    with pytest.raises(RuntimeError):
        async with pool.track(backend):
            assert backend.in_flight == 1
            raise RuntimeError("upstream broke")
    assert backend.in_flight == 0

    async def hold() -> None:
        async with pool.track(backend):
            await asyncio.sleep(10)

    task = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert backend.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.in_flight == 0


def test_unhealthy_and_draining_backends_are_not_routable() -> None:
    pool = healthy_pool(3)
    pool.set_health(pool.backends[0], False)
    pool.backends[1].draining = True
    pool.changed()
    assert [b.index for b in pool.routable] == [2]


@pytest.mark.parametrize(
    ("requested", "served"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
        ("google/gemma-2-2b-it", "gemma-2-2b"),
        ("TINY", "tiny"),
        ("org/tiny", "tiny-instruct"),
    ],
)
def test_normalised_model_names_match(requested: str, served: str) -> None:
    assert normalise(requested) == normalise(served)


def test_model_routing_exact_match_wins_over_normalised() -> None:
    pool = healthy_pool(2, [frozenset({"tiny"}), frozenset({"Tiny-Instruct"})])
    router = ModelRouter(pool)
    assert router.needs_model
    assert [b.index for b in router.candidates("Tiny-Instruct", pool.routable)] == [1]
    assert {b.index for b in router.candidates("org/TINY-it", pool.routable)} == {0, 1}


def test_unknown_model_lists_available_models() -> None:
    pool = healthy_pool(2, [frozenset({"a"}), frozenset({"b"})])
    router = ModelRouter(pool)
    with pytest.raises(ModelNotFound) as info:
        router.candidates("c", pool.routable)
    assert "a, b" in info.value.message and info.value.status == 404


def test_one_model_set_needs_no_body() -> None:
    pool = healthy_pool(2, [frozenset({"a"}), frozenset({"a"})])
    assert not ModelRouter(pool).needs_model


def test_config_defaults_and_errors_name_the_key(tmp_path: object) -> None:
    config = load([])
    assert config.workers == () and config.port == 8000
    assert load(["--workers", "http://a:1,http://b:2/", "--workers", "http://c:3"]).worker_urls() == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]
    with pytest.raises(ConfigError, match="unhealthy_threshold"):
        from_mapping(BalancerConfig, {"unhealthy_threshold": 0})
    with pytest.raises(ConfigError, match="bogus"):
        from_mapping(BalancerConfig, {"bogus": 1})
    with pytest.raises(ConfigError, match="workers"):
        from_mapping(BalancerConfig, {"workers": "ftp://x"})


def test_config_env_and_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    yaml_file = tmp_path / "lb.yaml"
    yaml_file.write_text("policy: round_robin\nmax-retries: 5\n")
    config = load(["--config", str(yaml_file)])
    assert config.policy == "round_robin" and config.max_retries == 5
    from lb.settings import load_config

    env_config = load_config(
        BalancerConfig, [], prog="lb", description="", env_prefix="IB_LB_", environ={"IB_LB_MAX_QUEUE": "7"}
    )
    assert env_config.max_queue == 7


def test_bearer_check() -> None:
    check_bearer("Bearer k2", ("k1", "k2"))
    for header in (None, "", "Bearer", "Bearer nope", "Basic k1"):
        with pytest.raises(Unauthorized):
            check_bearer(header, ("k1", "k2"))


async def test_admission_queues_fifo_and_hands_over_released_slots() -> None:
    pool = healthy_pool(1)
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=1, max_queue=2, queue_timeout=5)
    backend = pool.backends[0]
    order: list[str] = []

    async def request(name: str, hold: float) -> None:
        chosen = await admission.choose(lambda: pool.routable)
        async with pool.track(chosen):
            order.append(name)
            await asyncio.sleep(hold)

    first = asyncio.create_task(request("first", 0.05))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(request(n, 0.01)) for n in ("second", "third")]
    await asyncio.sleep(0)
    assert admission.depth == 2
    with pytest.raises(QueueFull):
        await admission.choose(lambda: pool.routable)
    await asyncio.gather(first, *waiting)
    assert order == ["first", "second", "third"]
    assert backend.in_flight == 0 and backend.reserved == 0


async def test_admission_queue_timeout_is_429_and_leaks_nothing() -> None:
    pool = healthy_pool(1)
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=1, max_queue=4, queue_timeout=0.05)
    async with pool.track(pool.backends[0]):
        with pytest.raises(QueueFull):
            await admission.choose(lambda: pool.routable)
        assert admission.depth == 0
    assert pool.backends[0].in_flight == 0 and pool.backends[0].reserved == 0


async def test_admission_cancelled_after_grant_returns_the_slot() -> None:
    pool = healthy_pool(1)
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=1, max_queue=4, queue_timeout=5)
    backend = pool.backends[0]
    holder = pool.track(backend)
    await holder.__aenter__()
    waiter = asyncio.create_task(admission.choose(lambda: pool.routable))
    await asyncio.sleep(0)
    await holder.__aexit__(None, None, None)  # grants the slot to the waiter ...
    assert backend.reserved == 1
    waiter.cancel()  # ... which is cancelled before it could use it
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert backend.reserved == 0 and backend.in_flight == 0


async def test_admission_without_healthy_backend_is_503() -> None:
    pool = healthy_pool(1)
    pool.set_health(pool.backends[0], False)
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=None, max_queue=4, queue_timeout=5)
    with pytest.raises(NoHealthyBackend):
        await admission.choose(lambda: pool.routable)
