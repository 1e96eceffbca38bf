"""The HTTP/1.1 rules both sides share: origin-form targets, hop-by-hop headers, and no header that could
add a line to a head the balancer writes."""

from __future__ import annotations

import pytest

from lb.http11 import header_block, origin_form, worker_headers


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v1/chat/completions?a=1", b"/v1/chat/completions?a=1"),
        (b"http://evil.example/v1/chat/completions?a=1", b"/v1/chat/completions?a=1"),
        (b"HTTPS://evil.example", b"/"),
        (b"http://evil.example?x=1", b"/?x=1"),
        (b"example.com:443", None),  # authority-form
        (b"*", None),
        (b"ftp://host/x", None),
        (b"/x\x7f", None),
        (b"/x y", None),
        (b"/caf\xc3\xa9", None),  # targets are visible ASCII; clients percent-encode
    ],
)
def test_targets_are_forwarded_in_origin_form(target: bytes, expected: bytes | None) -> None:
    assert origin_form(target) == expected


@pytest.mark.parametrize(
    "bad",
    [
        (b"X-A", b"a\r\nInjected: 1"),
        (b"X-A", b"a\nb"),
        (b"X-A", b"a\rb"),
        (b"X-A", b"a\x00b"),
        (b"X-A\r\nB", b"1"),
    ],
)
def test_a_header_that_could_add_a_line_is_dropped(bad: tuple[bytes, bytes]) -> None:
    # other invalid names and values never get this far: llhttp refuses them on the way in
    # (tests/test_lb_adversarial.py, tests/test_lb_bad_worker.py)
    assert header_block([(b"X-Ok", b"1"), bad, (b"X-Tab", b"a\tb")]) == b"X-Ok: 1\r\nX-Tab: a\tb\r\n"


def test_hop_by_hop_and_connection_listed_headers_never_reach_a_worker() -> None:
    raw = [
        (b"Host", b"lb"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"2"),
        (b"Authorization", b"Bearer client"),
        (b"X-Kept", b"1"),
    ]
    kept = [(b"Authorization", b"Bearer client"), (b"X-Kept", b"1")]
    assert worker_headers(raw, drop_credentials=False) == kept
    assert worker_headers(raw, drop_credentials=True, add=[(b"Authorization", b"Bearer w")]) == [
        (b"X-Kept", b"1"),
        (b"Authorization", b"Bearer w"),
    ]
