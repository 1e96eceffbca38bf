"""`python -m lb`: serve on uvloop; SIGTERM/SIGINT drain in-flight requests, then exit 0 (lb/shutdown.py)."""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from lb import redaction
from lb.aiohttp_server import AiohttpConnections
from lb.app import create_app
from lb.config import BalancerConfig, load
from lb.front import Front
from lb.settings import ConfigError
from lb.shutdown import CLOSE_GRACE_S, drain, wait_for_signal
from lb.state import STATE

log = logging.getLogger("lb")


async def serve(config: BalancerConfig) -> None:
    app = create_app(config)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream request
    # shutdown_timeout: what aiohttp waits for its handlers once the drain itself is over (lb/shutdown.py)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=CLOSE_GRACE_S)
    await runner.setup()  # runs cleanup_ctx startup: session, first probe of every worker, health checker
    # the front owns the socket: it bounds every connection and serves the hot endpoints itself (unless
    # --no-fast-front); it hands any other connection to aiohttp's protocol
    assert runner.server is not None  # set by setup()
    front = Front(app[STATE].proxy, AiohttpConnections(runner.server), config)
    await front.start(config.host, config.port)
    state = app[STATE]
    log.info(
        "listening on http://%s:%d, policy %s, %d worker(s)",
        config.host,
        config.port,
        config.policy,
        len(config.worker_urls()),
    )
    if config.admin_secret() is None:
        log.warning(
            "no --admin-token(-file): the admin API (POST/DELETE /workers) answers any loopback client, so "
            "on a shared machine every local user may add or remove workers"
        )
    await wait_for_signal()
    await drain(state, front, runner, config.drain_timeout)
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        config = load(argv)
    except ConfigError as exc:
        print(f"python -m lb: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # before anything is logged: every key and token the balancer holds
    redaction.install([*config.api_keys(), config.admin_secret() or "", config.worker_api_key or ""])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
