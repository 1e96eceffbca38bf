"""Intake: what a request must show before routing when a feature asks for it (affinity policies,
least_tokens, rate limits, the response cache): its Work, its rate-limit headers, its cache entry.

Built only when something needs it; round robin and least connections without limits or cache have none, so
their bodies pass through unparsed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

from lb.auth import client_key
from lb.cache import Entry, ResponseCache, cache_key
from lb.config import BalancerConfig
from lb.metrics import Metrics
from lb.policies import POLICIES
from lb.ratelimit import RateLimiter
from lb.work import Work, WorkReader, header

Headers = list[tuple[str, str]]


class Admitted(NamedTuple):
    work: Work
    extra: Headers  # response headers for every answer (x-ratelimit-*)
    stored: bytes | None  # the cache key under which a 200 answer is kept
    hit: Entry | None  # the cached answer, when there is one


class Intake:
    def __init__(self, config: BalancerConfig, metrics: Metrics) -> None:
        limits = config.key_limits()
        limited = config.rate_limit_rpm is not None or config.rate_limit_tpm is not None or bool(limits)
        self.limiter = RateLimiter(config.rate_limit_rpm, config.rate_limit_tpm, limits) if limited else None
        self.cache = ResponseCache(config.cache_size) if config.cache_size else None
        self._metrics = metrics
        needs = POLICIES[config.policy].needs
        if limited:
            needs |= {"tokens"}  # --rate-limit-tpm counts the same estimate least_tokens routes by
        if self.cache is not None:
            needs |= {"payload"}
        self.needs = needs
        self._reader = WorkReader(needs, config.affinity_prefix_chars, config.session_header)

    @staticmethod
    def wanted(config: BalancerConfig) -> bool:
        """Whether any feature needs an intake at all."""
        return bool(
            POLICIES[config.policy].needs
            or config.rate_limit_rpm is not None
            or config.rate_limit_tpm is not None
            or config.key_limits()
            or config.cache_size
        )

    def admit(
        self, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes] | None
    ) -> Admitted:
        """The request's Work, counted against its key's limits (429 beyond), looked up in the cache."""
        whole = body if isinstance(body, bytes) else None
        work = self._reader.read(headers, whole, None)
        extra: Headers = []
        if self.limiter is not None:
            key = client_key(header(headers, b"authorization"), header(headers, b"x-api-key"))
            extra = self.limiter.admit(key, work.tokens)
        stored = None
        hit = None
        if self.cache is not None and work.payload is not None and whole is not None:
            stored = cache_key(target, work.payload, whole)
            if stored is not None:
                hit = self.cache.get(stored)
                self._metrics.cache_lookup(hit is not None)
        return Admitted(work, extra, stored, hit)

    def store(self, stored: bytes, entry: Entry) -> None:
        if self.cache is not None:
            self.cache.put(stored, entry)
