"""Routing policies: one small class per policy, one method, chosen by name from POLICIES.

The caller has already filtered the candidates (healthy, not draining, serving the model, under the in-flight
cap), so a policy only ranks a non-empty sequence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from lb.backends import Backend


class Policy(Protocol):
    def choose(self, candidates: Sequence[Backend]) -> Backend:
        """Pick one of a non-empty sequence of routable backends."""
        ...


class RoundRobin:
    """Strict rotation over the candidates, in index order."""

    def __init__(self) -> None:
        self._counter = 0

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        backend = candidates[self._counter % len(candidates)]
        self._counter += 1
        return backend


class LeastConnections:
    """Fewest in-flight requests; ties go round-robin so idle backends share the load evenly."""

    def __init__(self) -> None:
        self._counter = 0

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        n = len(candidates)
        start = self._counter % n
        self._counter += 1
        best = candidates[start]
        for i in range(1, n):
            backend = candidates[(start + i) % n]
            if backend.in_flight < best.in_flight:
                best = backend
        return best


class PowerOfTwo:
    """Two candidates at random, the one with fewer in flight (cheap, and avoids herding on one backend)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return b if b.in_flight < a.in_flight else a


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "power_of_two": PowerOfTwo,
}
