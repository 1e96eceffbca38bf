"""Who owns a file or a batch: with --api-key, the key that created it (kept as a hash, never the key)."""

from __future__ import annotations

import hashlib

from aiohttp import web

from lb.state import STATE


def owner_of(request: web.Request) -> str | None:
    """Check the client's key like the proxy does (401 without a good one); its owner tag, or None when the
    balancer has no keys (then every file and batch is everyone's)."""
    state = request.app[STATE]
    header = request.headers.get("Authorization")
    state.proxy.check_key(header)
    if not state.config.api_keys():
        return None
    token = header[7:].strip() if header else ""
    return hashlib.sha256(token.encode()).hexdigest()[:32]
