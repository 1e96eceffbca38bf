"""The balancer's upstream connection pool closes keep-alive connections that stayed idle too long."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lb import upstream
from lb.upstream import UpstreamClient
from tests.lb_upstream import chat


async def test_idle_upstream_connections_are_closed_after_the_idle_ttl(
    upstreams: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "IDLE_TTL", 0.2)
    up = await upstreams()
    client = UpstreamClient(connect_timeout=5, read_timeout=5)
    body = json.dumps(chat()).encode()
    responses = await asyncio.gather(
        *(
            client.request("127.0.0.1", up.port, False, "POST", "/v1/chat/completions", [], body)
            for _ in range(3)
        )
    )
    for response in responses:
        await response.read()
        response.release()  # read to the end: back to the pool, idle
    pooled = [conn for idle in client._idle.values() for conn in idle]
    assert len(pooled) == 3 and not any(conn.closed for conn in pooled)
    expiry = asyncio.create_task(client.expire_idle())
    try:
        await asyncio.sleep(0.5)  # two sweeps: the connections are past IDLE_TTL at the second
    finally:
        expiry.cancel()
    assert all(conn.closed for conn in pooled)
    assert not any(client._idle.values())
    client.close()
