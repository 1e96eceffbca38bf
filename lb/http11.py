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
NONE: frozenset[bytes] = frozenset()
REQUEST_DROP = HOP_BY_HOP | {b"host"}  # the upstream client writes the worker's Host
CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
REQUEST_DROP_CREDENTIALS = REQUEST_DROP | CREDENTIALS
# a header name is an RFC 9110 token; a value holds no control byte but TAB (obs-text is allowed)
BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
BAD_TARGET = re.compile(rb"[^\x21-\x7e]")  # request targets are visible ASCII only


def valid_header(name: bytes, value: bytes) -> bool:
    return bool(name) and BAD_NAME.search(name) is None and BAD_VALUE.search(value) is None


def header_block(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """`Name: value\\r\\n` lines for a head. What goes in was parsed by llhttp (or made by the balancer), so
    it is checked here only for what would let one header add a line: one CR, one LF per line and no NUL
    (three C-speed counts); anything else falls back to checking each header, dropping invalid ones."""
    parts: list[bytes] = []
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    block = b"".join(parts)
    lines = len(headers)
    if block.count(b"\n") != lines or block.count(b"\r") != lines or b"\x00" in block:
        block = b"".join([b"%b: %b\r\n" % (k, v) for k, v in headers if valid_header(k, v)])
    return block


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection` (besides close / keep-alive): hop-by-hop too (RFC 9110 7.6.1)."""
    named: set[bytes] | None = None
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":  # the length first: no lower() for most
            named = named or set()
            named.update(t.strip().lower() for t in value.split(b","))
    if not named:
        return NONE
    return frozenset(named - {b"close", b"keep-alive", b""})


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


def end_to_end(headers: Sequence[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """`headers` less those named in `drop` (lower case; it holds `connection`) and those a `Connection`
    header lists. One pass, and a second only when a Connection header is there (rare in a request or a
    response, as HTTP/1.1 keeps connections alive without one)."""
    out = []
    listed = False
    for item in headers:
        name = item[0].lower()
        if name in drop:
            listed = listed or name == b"connection"
            continue
        out.append(item)
    if listed and (named := connection_named(headers)):
        out = [(k, v) for k, v in out if k.lower() not in named]
    return out


def worker_headers(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    drop_credentials: bool,
    add: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The client's headers as a worker receives them: hop-by-hop ones (and those `Connection` names)
    dropped, the client's credentials dropped when the balancer checked them itself, then `add` (the
    balancer's own headers, e.g. the worker key). The upstream client writes them through `header_block`,
    which checks every one."""
    out = end_to_end(raw_headers, REQUEST_DROP_CREDENTIALS if drop_credentials else REQUEST_DROP)
    out.extend(add)
    return out
