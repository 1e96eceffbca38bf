"""Routing policies: one small class per policy, one method, chosen by name from POLICIES.

The caller has already filtered the candidates (healthy, not draining or busy, serving the model, under the
in-flight cap), so a policy only ranks a non-empty sequence. Every policy honours `Backend.weight`: rotation
is smooth weighted round robin, loads are divided by the weight. A policy names what it `needs` to know of a
request (lb/work.py); the proxy reads headers or body only for those, so round robin and least connections
never parse a body.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from lb.backends import Backend
from lb.work import PLAIN, Work


@dataclass(frozen=True)
class Tuning:
    """The settings some policies take; every policy is built as `cls(tuning)`."""

    affinity_max_load: float = 1.25  # an affinity's preferred worker may carry this x its fair share
    rng: random.Random | None = None  # power_of_two's sampler (tests pass a seeded one)


DEFAULT = Tuning()


class Policy(Protocol):
    needs: ClassVar[frozenset[str]]  # parts of Work the policy reads: "prefix", "session", "tokens"

    def __init__(self, tuning: Tuning = DEFAULT) -> None: ...

    def choose(self, candidates: Sequence[Backend], work: Work = PLAIN) -> Backend:
        """Pick one of a non-empty sequence of routable backends."""
        ...


class SmoothRotation:
    """Smooth weighted round robin (nginx's): every pick adds each candidate's weight to its score, takes the
    highest score and takes the total off it, so weights 3:1 interleave as a a b a, never a a a b."""

    def __init__(self) -> None:
        self._score: dict[int, float] = {}  # backend index -> current score

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        score = self._score
        total = 0.0
        best = candidates[0]
        best_score = -math.inf
        for backend in candidates:
            s = score.get(backend.index, 0.0) + backend.weight
            score[backend.index] = s
            total += backend.weight
            if s > best_score:
                best, best_score = backend, s
        score[best.index] = best_score - total
        return best


class RoundRobin:
    """Rotation over the candidates in index order, each getting turns in proportion to its weight."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, tuning: Tuning = DEFAULT) -> None:
        self._rotation = SmoothRotation()

    def choose(self, candidates: Sequence[Backend], work: Work = PLAIN) -> Backend:
        return self._rotation.pick(candidates)


class LeastConnections:
    """Fewest in-flight requests per unit of weight; ties rotate (weighted), so idle backends share."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, tuning: Tuning = DEFAULT) -> None:
        self._rotation = SmoothRotation()

    def choose(self, candidates: Sequence[Backend], work: Work = PLAIN) -> Backend:
        best = math.inf
        ties: list[Backend] = []
        for backend in candidates:
            load = backend.in_flight / backend.weight
            if load < best:
                best, ties = load, [backend]
            elif load == best:
                ties.append(backend)
        return ties[0] if len(ties) == 1 else self._rotation.pick(ties)


class LeastTokens:
    """Fewest estimated tokens in flight (prompt bytes / 4 + max_tokens, lb/work.py) per unit of weight: a
    worker with one long request counts as busier than one with three short ones."""

    needs: ClassVar[frozenset[str]] = frozenset({"tokens"})

    def __init__(self, tuning: Tuning = DEFAULT) -> None:
        self._rotation = SmoothRotation()

    def choose(self, candidates: Sequence[Backend], work: Work = PLAIN) -> Backend:
        best = math.inf
        ties: list[Backend] = []
        for backend in candidates:
            load = backend.tokens_in_flight / backend.weight
            if load < best:
                best, ties = load, [backend]
            elif load == best:
                ties.append(backend)
        return ties[0] if len(ties) == 1 else self._rotation.pick(ties)


class PowerOfTwo:
    """Two candidates drawn in proportion to weight, the one with fewer in flight per unit of weight (cheap,
    and avoids herding on one backend)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, tuning: Tuning = DEFAULT) -> None:
        self._rng = tuning.rng or random.Random()

    def choose(self, candidates: Sequence[Backend], work: Work = PLAIN) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        if all(c.weight == 1.0 for c in candidates):
            a, b = self._rng.sample(candidates, 2)
        else:
            a = self._rng.choices(candidates, [c.weight for c in candidates])[0]
            rest = [c for c in candidates if c is not a]
            b = self._rng.choices(rest, [c.weight for c in rest])[0]
        return b if b.in_flight * a.weight < a.in_flight * b.weight else a


_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: 64 well-spread bits from a key hash xor a backend hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def rendezvous(key: str, candidates: Sequence[Backend]) -> Backend:
    """Weighted rendezvous (highest-random-weight) hashing: the candidate with the best score `w / -ln(u)`
    for u uniform in (0, 1) from hash(key, backend). Consistent: removing a backend moves only the keys it
    held, adding one takes a weight-proportional share; stable across restarts (blake2b, not hash())."""
    key_hash = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    best = candidates[0]
    best_score = -1.0
    for backend in candidates:
        u = (_mix(key_hash ^ backend.hash) + 0.5) / 18446744073709551616.0  # 2**64: u in (0, 1)
        score = backend.weight / -math.log(u)
        if score > best_score:
            best, best_score = backend, score
    return best


AFFINITY_SLACK = 4  # requests: a key's backend this close to the least-loaded one is never passed over


class _BoundedAffinity:
    """A key's rendezvous choice, unless that backend already carries more than `affinity_max_load` x its
    weighted share of the requests in flight (this one included, rounded up) *and* AFFINITY_SLACK more than
    the least-loaded backend: then the least-loaded one. Bounded-load consistent hashing gives affinity for
    cache reuse without hot spots; the absolute slack (as SGLang's router has) keeps a few requests of noise
    at low concurrency, where the ratio alone would spill at 2 in flight, from breaking affinity."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, tuning: Tuning = DEFAULT) -> None:
        self._max_load = tuning.affinity_max_load
        self._fallback = LeastConnections(tuning)

    def choose(self, candidates: Sequence[Backend], work: Work = PLAIN) -> Backend:
        if work.key is None or len(candidates) == 1:
            return self._fallback.choose(candidates, PLAIN)
        preferred = rendezvous(work.key, candidates)
        total = sum(b.in_flight for b in candidates)
        weights = sum(b.weight for b in candidates)
        capacity = math.ceil(self._max_load * (total + 1) * preferred.weight / weights)
        if preferred.in_flight + 1 <= capacity:
            return preferred
        least = self._fallback.choose(candidates, PLAIN)
        if preferred.in_flight - least.in_flight < AFFINITY_SLACK:
            return preferred
        return least


class PrefixAffinity(_BoundedAffinity):
    """Requests sharing the first --affinity-prefix-chars of their prompt text go to the same backend, so
    its prefix cache (vLLM's, SGLang's) serves them; bounded by load (see _BoundedAffinity)."""

    needs: ClassVar[frozenset[str]] = frozenset({"prefix"})


class SessionAffinity(_BoundedAffinity):
    """Requests of one session (the --session-header, else the body's `user`) go to the same backend;
    bounded by load. Requests without a session go to the least-loaded backend."""

    needs: ClassVar[frozenset[str]] = frozenset({"session"})


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "power_of_two": PowerOfTwo,
    "least_tokens": LeastTokens,
    "prefix_affinity": PrefixAffinity,
    "session": SessionAffinity,
}
