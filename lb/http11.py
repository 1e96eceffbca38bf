"""HTTP/1.1 rules both sides of the balancer share: which headers are hop-by-hop, what a valid header and
target look like, and the one function that builds the headers a worker receives.

The parsers (llhttp through httptools on the lean paths, aiohttp's llhttp on the other) already reject
malformed input; the checks here guard what the balancer itself writes, as uvicorn checks its own headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# RFC 9110 7.6.1 hop-by-hop headers, plus the framing headers each side recomputes
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
REQUEST_DROP = HOP_BY_HOP | {b"host"}  # the upstream client writes the worker's Host
CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
# a header name is an RFC 9110 token; a value holds no control byte but TAB (obs-text is allowed)
BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
BAD_TARGET = re.compile(rb"[^\x21-\x7e]")  # request targets are visible ASCII only


def valid_header(name: bytes, value: bytes) -> bool:
    return bool(name) and BAD_NAME.search(name) is None and BAD_VALUE.search(value) is None


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection` (besides close / keep-alive): hop-by-hop too (RFC 9110 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    named -= {b"close", b"keep-alive", b""}
    return frozenset(named)


def origin_form(target: bytes) -> bytes | None:
    """The target as `/path?query`: absolute-form (`http://host/path`) is rewritten, as nginx does; None
    when it is not a usable target (not visible ASCII, authority-form, `*`)."""
    if BAD_TARGET.search(target) is not None:
        return None
    if target.startswith(b"/"):
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    slash = rest.find(b"/")
    query = rest.find(b"?")
    if slash < 0 or (0 <= query < slash):
        return b"/" + rest[query:] if query >= 0 else b"/"
    return rest[slash:]


def worker_headers(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    drop_credentials: bool,
    add: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The client's headers as a worker receives them: hop-by-hop ones (and those `Connection` names)
    dropped, the client's credentials dropped when the balancer checked them itself, then `add` (the
    balancer's own headers, e.g. the worker key). Anything that is not a valid header is dropped too, so no
    byte of it can reach a worker's parser."""
    drop = REQUEST_DROP | CREDENTIALS if drop_credentials else REQUEST_DROP
    if any(name.lower() == b"connection" for name, _ in raw_headers):
        drop = drop | connection_named(raw_headers)
    out = [(k, v) for k, v in raw_headers if k.lower() not in drop and valid_header(k, v)]
    out.extend(add)
    return out
