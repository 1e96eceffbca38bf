"""Credentials stay secret: never in the balancer's log (any level, malformed-request dumps included),
/stats, /metrics or /workers; the admin token can come from a file; without one, start-up says admin is
loopback-only."""

from __future__ import annotations

import logging
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SpawnFn
from tests.lb_cluster import post_json, start_lb, start_workers
from tests.processes import free_port, python_module
from tests.processes import test_env as child_env

API_KEY = "sk-client-SECRET-4242"
ADMIN_TOKEN = "admin-SECRET-7777"
WRONG_KEY = "sk-someone-else-1313"  # a wrong key is someone's secret too
BODY = b'{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\n"
# raw requests, malformed in the ways that make a parser dump the offending line, each carrying a key
RAW_REQUESTS = [
    CHAT_HEAD + b"Authorization: Bearer %s\x00\r\nContent-Length: %d\r\n\r\n%s",
    CHAT_HEAD + b"Authorization: Bearer %s\x01\r\nContent-Length: %d\r\n\r\n%s",
    b"\xffPOST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s",
    CHAT_HEAD
    + b"Authorization: Bearer %s\r\nX-A: b\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%s",
    CHAT_HEAD + b"X-API-Key: %s\x7f\r\nContent-Length: %d\r\n\r\n%s",
    b"GET /stats HTTP/1.1\r\nHost: lb\r\nAuthorization: Bearer %s\x02\r\nX-Len: %d\r\n\r\n%s",
    CHAT_HEAD + b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s",  # well-formed
]


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        try:
            return sock.recv(4096)
        except OSError:
            return b""


def get_text(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return str(resp.read().decode())


@pytest.mark.parametrize("front", ["--fast-front", "--no-fast-front"])
def test_credentials_never_reach_the_log_stats_or_metrics(spawn: SpawnFn, tmp_path: Path, front: str) -> None:
    workers = start_workers(spawn, 1)
    (tmp_path / "api-key").write_text(API_KEY + "\n")
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    lb = start_lb(
        spawn,
        workers,
        "--api-key-file",
        str(tmp_path / "api-key"),
        "--admin-token-file",
        str(tmp_path / "admin-token"),
        "--log-level",
        "debug",
        front,
    )
    for key in (API_KEY, WRONG_KEY):
        for template in RAW_REQUESTS:
            send_raw(lb.port, template % (key.encode(), len(BODY), BODY))
    assert b" 200 " in send_raw(lb.port, RAW_REQUESTS[-1] % (API_KEY.encode(), len(BODY), BODY))
    for token in (ADMIN_TOKEN, WRONG_KEY):  # an admin call with the right token and one with a wrong one
        request = urllib.request.Request(
            lb.url + "/workers",
            data=b'{"url": "%s"}' % workers[0].url.encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
    paths = ("/stats", "/metrics", "/workers", "/health", "/config", "/cluster")
    pages = [get_text(lb.url + path, ADMIN_TOKEN) for path in paths]
    lb.proc.signal(signal.SIGTERM)
    lb.proc.popen.wait(20)
    log = lb.proc.log_path.read_text(errors="replace")
    assert "listening on" in log  # the log was written at all
    for secret in (API_KEY, ADMIN_TOKEN, WRONG_KEY):
        assert secret not in log
        for page in pages:
            assert secret not in page


def test_admin_token_file_guards_the_admin_api_even_from_loopback(spawn: SpawnFn, tmp_path: Path) -> None:
    workers = start_workers(spawn, 1)
    token_file = tmp_path / "admin-token"
    token_file.write_text("# the admin token\n" + ADMIN_TOKEN + "\n")
    lb = start_lb(spawn, [], "--admin-token-file", str(token_file))
    status, body = post_json(lb.url + "/workers", {"url": workers[0].url})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # loopback alone is not enough
    request = urllib.request.Request(
        lb.url + "/workers",
        data=b'{"url": "%s"}' % workers[0].url.encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 201
    assert "answers any loopback client" not in lb.proc.log_path.read_text()


def test_without_a_token_start_up_says_admin_is_loopback_only(spawn: SpawnFn) -> None:
    lb = start_lb(spawn, [])
    log = lb.proc.log_path.read_text()
    assert "the admin API (POST/DELETE /workers) answers any loopback client" in log


def test_an_empty_admin_token_file_is_a_config_error(spawn: SpawnFn, tmp_path: Path) -> None:
    empty = tmp_path / "admin-token"
    empty.write_text("\n")
    proc = spawn(python_module("lb", "--port", str(free_port()), "--admin-token-file", str(empty)))
    assert proc.popen.wait(30) == 2
    assert "admin_token_file" in proc.log_tail()


@pytest.mark.parametrize(
    "line",
    [
        "Authorization: Bearer sk-live-123",
        "b'Authorization: Bearer sk-live-123\\x01'",
        "{'Authorization': 'Bearer sk-live-123', 'Host': 'x'}",
        "authorization: sk-live-123",
        "X-API-Key: sk-live-123",
        "headers=[(b'x-api-key', b'sk-live-123')]",
        "upstream said: bearer sk-live-123",
    ],
)
def test_redactor_masks_keys_in_every_shape_a_log_line_takes(line: str) -> None:
    from lb.redaction import Redactor

    record = logging.LogRecord("lb", logging.ERROR, __file__, 1, "dump: %s", (line,), None)
    Redactor([]).filter(record)  # by shape alone: the key is not one the balancer knows
    assert "sk-live-123" not in record.getMessage() and "***" in record.getMessage()


def test_redactor_masks_the_configured_secrets_anywhere() -> None:
    from lb.redaction import Redactor

    try:
        raise ValueError("bad token sk-live-123 in a traceback")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "lb", logging.ERROR, __file__, 1, "saw %s", ("sk-live-123",), sys.exc_info()
        )
    Redactor(["sk-live-123"]).filter(record)
    assert "sk-live-123" not in logging.Formatter().format(record)


def test_config_masks_a_key_and_token_given_as_values(spawn: SpawnFn) -> None:
    port = free_port()
    env = child_env(IB_LB_API_KEY=API_KEY, IB_LB_ADMIN_TOKEN=ADMIN_TOKEN)  # values, not files
    proc = spawn(python_module("lb", "--port", str(port)), name="lb", env=env)
    proc.wait_http_ok(f"http://127.0.0.1:{port}/stats")
    config = get_text(f"http://127.0.0.1:{port}/config", ADMIN_TOKEN)
    assert '"admin_token": "' in config  # the key is listed, its value masked
    for path in ("/config", "/stats", "/metrics", "/cluster"):
        page = get_text(f"http://127.0.0.1:{port}{path}", ADMIN_TOKEN)
        assert API_KEY not in page and ADMIN_TOKEN not in page
