"""Request identity across hops: X-Request-ID (the client's, or a new one) and optional OpenTelemetry spans.

The id travels to the worker and back to the client, so one request can be followed through both logs. A W3C
`traceparent` header is never touched: it passes through to the worker like any other end-to-end header.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

REQUEST_ID = b"x-request-id"


def request_id(raw_headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """(the id, whether the client sent it): the client's X-Request-ID when present, else a fresh one."""
    for name, value in raw_headers:
        if len(name) == 12 and name.lower() == REQUEST_ID and value:
            return value, True
    return uuid.uuid4().hex.encode(), False
