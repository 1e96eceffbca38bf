"""Routing that knows the work, without sockets: weights, affinity, token load, work reader, rate limits."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lb.backends import Backend, BackendPool
from lb.config import BalancerConfig, load
from lb.policies import POLICIES, LeastTokens, PrefixAffinity, RoundRobin, Tuning, rendezvous
from lb.ratelimit import RateLimited, RateLimiter, reset_text
from lb.settings import ConfigError, from_mapping
from lb.work import PLAIN, Work, WorkReader


def weighted_pool(*weights: float) -> BackendPool:
    pool = BackendPool()
    for i, weight in enumerate(weights):
        pool.set_health(pool.add(f"http://127.0.0.1:{9100 + i}", weight=weight), True)
    return pool


@pytest.mark.parametrize("name", ["round_robin", "least_connections", "least_tokens", "power_of_two"])
def test_weights_3_to_1_split_400_sequential_requests_3_to_1(name: str) -> None:
    pool = weighted_pool(3, 1)
    policy = POLICIES[name](Tuning(rng=random.Random(1)))
    picks = Counter(policy.choose(pool.routable, PLAIN).index for _ in range(400))
    assert abs(picks[0] - 300) <= 20, picks  # within 5% of 400


def test_smooth_round_robin_interleaves_weights() -> None:
    pool = weighted_pool(3, 1)
    policy = RoundRobin(Tuning())
    assert [policy.choose(pool.routable).index for _ in range(8)] == [0, 0, 1, 0, 0, 0, 1, 0]


def test_least_connections_divides_in_flight_by_weight() -> None:
    pool = weighted_pool(3, 1)
    heavy, light = pool.routable
    heavy.in_flight, light.in_flight = 5, 2  # 5/3 < 2/1: the heavy worker is relatively less loaded
    assert POLICIES["least_connections"](Tuning()).choose(pool.routable).index == 0


def test_least_tokens_prefers_few_long_tokens_over_many_requests() -> None:
    pool = weighted_pool(1, 1)
    long_one, many_short = pool.routable
    long_one.in_flight, long_one.tokens_in_flight = 1, 4000
    many_short.in_flight, many_short.tokens_in_flight = 6, 60
    assert LeastTokens(Tuning()).choose(pool.routable).index == 1


async def test_token_load_is_released_exactly_on_every_exit() -> None:
    pool = weighted_pool(1)
    (backend,) = pool.routable
    async with pool.track(backend, tokens=300):
        assert backend.tokens_in_flight == 300
    with pytest.raises(RuntimeError):
        async with pool.track(backend, tokens=200):
            raise RuntimeError("the worker failed")
    assert (backend.in_flight, backend.tokens_in_flight) == (0, 0)


def test_removing_one_of_four_workers_remaps_only_its_keys() -> None:
    pool = weighted_pool(1, 1, 1, 1)
    keys = [f"few-shot prefix {i}" for i in range(2000)]
    before = {k: rendezvous(k, pool.routable).index for k in keys}
    assert set(Counter(before.values()).values()) <= set(range(400, 600))  # balanced, roughly 500 each
    gone = pool.routable[2]
    pool.remove(gone)
    after = {k: rendezvous(k, pool.routable).index for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone.index for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == gone.index)


def test_affinity_spills_to_least_loaded_when_preferred_is_over_the_bound() -> None:
    pool = weighted_pool(1, 1, 1)
    policy = PrefixAffinity(Tuning(affinity_max_load=1.25))
    work = Work(key="system: you are a grader\nuser: ...")
    preferred = policy.choose(pool.routable, work)
    assert all(policy.choose(pool.routable, work) is preferred for _ in range(20))
    others = [b for b in pool.routable if b is not preferred]
    preferred.in_flight = 3  # over ceil(1.25 * 5 / 3) = 3, but within AFFINITY_SLACK of the others
    others[0].in_flight = 1
    assert policy.choose(pool.routable, work) is preferred
    preferred.in_flight = 5  # over ceil(1.25 * 7 / 3) = 3 and 5 ahead of the least loaded
    assert policy.choose(pool.routable, work) is others[1]
    preferred.in_flight = 2  # within the slack again: back to the key's worker
    assert policy.choose(pool.routable, work) is preferred


def test_affinity_without_a_key_goes_to_the_least_loaded() -> None:
    pool = weighted_pool(1, 1)
    pool.routable[0].in_flight = 2
    assert PrefixAffinity(Tuning()).choose(pool.routable, PLAIN) is pool.routable[1]


def test_work_reader_reads_only_what_is_needed() -> None:
    body = b'{"model": "m", "messages": [{"role": "system", "content": "Grade this."}, {"role": "user", "content": "2+2=4"}], "max_tokens": 100}'  # noqa: E501
    prefix = WorkReader(frozenset({"prefix"}), 20, "X-Session-ID").read([], body, None)
    assert prefix.key == "system:Grade this.\nu" and prefix.tokens == 0
    tokens = WorkReader(frozenset({"tokens"}), 20, "X-Session-ID").read([], body, None)
    assert tokens.tokens == len(body) // 4 + 100 and tokens.key is None
    session = WorkReader(frozenset({"session"}), 20, "X-Session-ID")
    assert session.read([(b"x-session-id", b"abc")], b"not json", None).key == "abc"  # header: body unread
    assert session.read([], b'{"user": "u-7"}', None).key == "u-7"
    # a body routing cannot read is the worker's to refuse: no key, no payload, no error here
    assert WorkReader(frozenset({"prefix"}), 20, "X-Session-ID").read([], b"[1, 2]", None) == Work()


def test_worker_weights_from_flags_and_file(tmp_path: Path) -> None:
    listed = tmp_path / "workers.txt"
    listed.write_text("http://10.0.0.3:8000@0.5\n# a comment\nhttp://user@10.0.0.4:8000\n")
    config = from_mapping(
        BalancerConfig,
        {"workers": ["http://10.0.0.1:8000@3", "http://10.0.0.2:8000"], "workers_file": str(listed)},
    )
    assert config.worker_specs() == [
        ("http://10.0.0.1:8000", 3.0),
        ("http://10.0.0.2:8000", 1.0),
        ("http://10.0.0.3:8000", 0.5),
        ("http://user@10.0.0.4:8000", 1.0),
    ]
    with pytest.raises(ConfigError, match="weight"):
        from_mapping(BalancerConfig, {"workers": ["http://10.0.0.1:8000@0"]})


def test_worker_weights_from_yaml(tmp_path: Path) -> None:
    config_file = tmp_path / "lb.yaml"
    config_file.write_text(
        "workers:\n  - http://10.0.0.1:8000@2.5\n  - http://10.0.0.2:8000\npolicy: session\n"
    )
    config = load(["--config", str(config_file)])
    assert config.worker_specs() == [("http://10.0.0.1:8000", 2.5), ("http://10.0.0.2:8000", 1.0)]


def test_key_file_carries_per_key_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alpha rpm=60\nbeta rpm=5 tpm=1000\ngamma\n")
    config = from_mapping(BalancerConfig, {"api_key_file": str(keys), "rate_limit_tpm": 50000})
    assert config.api_keys() == ("alpha", "beta", "gamma")
    assert config.key_limits() == {"alpha": (60, 50000), "beta": (5, 1000)}
    keys.write_text("alpha rpm=lots\n")
    with pytest.raises(ConfigError, match="rpm=N"):
        from_mapping(BalancerConfig, {"api_key_file": str(keys)})


def test_the_61st_request_in_a_minute_is_refused_and_others_keys_are_not() -> None:
    now = [1000.0]
    limiter = RateLimiter(60, None, {}, clock=lambda: now[0])
    for _ in range(60):
        headers = dict(limiter.admit("k1", 10))
        now[0] += 0.5  # 30 s for 60 requests: all inside one minute
    assert headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k1", 10)
    assert refused.value.code == "rate_limit_exceeded" and refused.value.retry_after == 30
    assert dict(refused.value.headers)["x-ratelimit-reset-requests"] == "30s"
    assert dict(limiter.admit("k2", 10))["x-ratelimit-remaining-requests"] == "59"
    now[0] += 30.0  # the first request leaves the window
    limiter.admit("k1", 10)


def test_token_limit_counts_estimated_tokens() -> None:
    now = [0.0]
    limiter = RateLimiter(None, 1000, {"big": (None, 100_000)}, clock=lambda: now[0])
    limiter.admit("k", 600)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k", 600)
    assert refused.value.type == "tokens"
    limiter.admit("big", 60_000)  # a per-key override
    assert reset_text(0.02) == "20ms" and reset_text(360) == "6m0s"


def test_backend_hash_is_stable_across_processes() -> None:
    assert Backend(0, "http://a:1").hash == Backend(7, "http://a:1").hash != Backend(0, "http://a:2").hash
