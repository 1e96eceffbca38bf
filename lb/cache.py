"""The opt-in response cache (--cache-size): repeats of deterministic, non-streamed requests from memory.

Deterministic means `temperature` 0 or a fixed `seed` (eval reruns, greedy decoding); anything sampled is
never cached. The key is the path and the exact body bytes (the body holds the model), so a request that
differs in any byte, key order included, is a miss. Streamed requests are never cached. Only complete 200
answers up to the proxy's one-write limit are kept; the least recently used entry goes first. A hit replays
the worker's status, headers and body, `id` and `created` included, with `X-LB-Cache: hit`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

Entry = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, the worker's headers as received, body


def cache_key(target: str, payload: dict[str, Any], body: bytes) -> bytes | None:
    """The cache key of a deterministic, non-streamed request; None for anything that must reach a worker."""
    if payload.get("stream"):
        return None
    temperature = payload.get("temperature")
    seed = payload.get("seed")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    if not (greedy or seeded):
        return None
    return hashlib.blake2b(target.encode() + b"\0" + body, digest_size=20).digest()


class ResponseCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()

    def get(self, key: bytes) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
