"""Reading a running balancer's /stats: standard library only.

Kept apart from lb/stats.py (which needs the balancer's dependencies) because the SLURM job's readiness check
runs it with the host's bare `python3` (slurm/connection.py), outside any virtual environment or container.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def fetch_stats(url: str, token: str | None = None, timeout: float = 3.0) -> dict[str, Any] | None:
    """A running balancer's /stats document, or None while it does not answer or when `url` is no balancer
    (e.g. a worker straight). `token` is sent as a bearer token (the admin token or an API key)."""
    request = urllib.request.Request(url.rstrip("/") + "/stats")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("workers"), list) else None
