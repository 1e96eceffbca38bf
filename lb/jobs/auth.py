"""Who owns a file or a batch: with --api-key, the key that created it (kept as a hash, never the key)."""

from __future__ import annotations

import hashlib

from aiohttp import web

from lb.auth import client_key
from lb.state import STATE


def owner_of(request: web.Request) -> str | None:
    """Check the client's key like the proxy does (401 without a good one); its owner tag, or None when the
    balancer has no keys (then every file and batch is everyone's)."""
    state = request.app[STATE]
    authorization, api_key = request.headers.get("Authorization"), request.headers.get("X-API-Key")
    state.proxy.check_key(authorization, api_key)
    if not state.config.api_keys():
        return None
    token = client_key(authorization, api_key)
    return hashlib.sha256(token.encode()).hexdigest()[:32]
