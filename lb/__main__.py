"""`python -m lb`: serve on uvloop; SIGTERM/SIGINT stop accepting, drain in-flight requests, exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from lb.app import STATE, create_app
from lb.config import BalancerConfig, load
from lb.settings import ConfigError

log = logging.getLogger("lb")


async def serve(config: BalancerConfig) -> None:
    app = create_app(config)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream request
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=config.drain_timeout
    )
    await runner.setup()  # runs cleanup_ctx startup: session, first probe of every worker, health checker
    site = web.TCPSite(runner, config.host, config.port, backlog=2048)
    await site.start()
    state = app[STATE]
    log.info(
        "listening on http://%s:%d, policy %s, %d worker(s)",
        config.host,
        config.port,
        config.policy,
        len(config.worker_urls()),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: no new connections, draining in-flight requests for up to %gs", config.drain_timeout
    )
    state.draining = True  # /health answers 503 while we drain
    # cleanup: close the listening socket, wait for running handlers up to shutdown_timeout, cancel the rest,
    # then the cleanup_ctx exit (stop the checker, close the session)
    await runner.cleanup()
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
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
