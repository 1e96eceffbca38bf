"""Shutdown in order: turn new work away, drain with a deadline, cut what is left visibly, close.

On the first SIGTERM/SIGINT the balancer keeps its port open so that probes see it leave: `/health` answers
503 ("draining") while `/livez` stays 200, queued requests and new ones get 503 `shutting_down`, and requests
already on a worker run on for up to --drain-timeout. At the deadline every SSE stream still running ends
with an error event (`data: {"error": {... "code": "shutting_down"}}`) instead of a bare close; then the
sockets close. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable

from aiohttp import web

from lb.errors import ShuttingDown
from lb.front import Front
from lb.state import BalancerState

log = logging.getLogger("lb")
DRAIN_POLL_S = 0.05  # seconds between in-flight checks while draining
CLOSE_GRACE_S = 2.0  # seconds, after the deadline, for cut streams to send their last event and close
FORCED_EXIT_CODE = 1


async def wait_for_signal() -> signal.Signals:
    """The first SIGTERM/SIGINT; from then on a second one of either exits the process at once."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)
            return
        log.warning("second signal (%s) while draining: exiting now", sig.name)
        logging.shutdown()  # flush the log before leaving without the usual clean-up
        os._exit(FORCED_EXIT_CODE)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await received


async def drain(
    state: BalancerState, front: Front | None, runner: web.AppRunner, drain_timeout: float
) -> None:
    """Everything after the first signal, in order; returns when every socket is closed."""
    # 1. turn work away: /health says 503, new and queued requests get 503, the port stays open for probes
    state.draining = True
    state.proxy.draining = True
    if hasattr(state, "batches"):  # set at start-up; a signal may come before it
        state.batches.pause()  # no new batch lines; those on a worker finish (and are kept) like any request
    refused = state.admission.fail_all(
        ShuttingDown("The balancer is shutting down; this queued request was not sent.")
    )
    log.info(
        "shutting down: /health answers 503, %d queued request(s) refused, draining %d in-flight request(s) "
        "for up to %gs (a second signal exits at once)",
        refused,
        state.pool.total_in_flight,
        drain_timeout,
    )
    # 2. requests already on a worker finish, within the deadline
    deadline = time.monotonic() + drain_timeout
    while state.pool.total_in_flight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a plain poll
        await asyncio.sleep(DRAIN_POLL_S)
    # 3. the deadline: running streams end with an SSE error event; the rest is cancelled below
    left = state.pool.total_in_flight
    if left:
        cut = state.proxy.cut_streams()
        log.warning(
            "drain deadline: %d request(s) still running, %d stream(s) cut with an error event", left, cut
        )
    # 4. close the sockets: the front and aiohttp each wait briefly for what is left, then cancel it, and
    #    aiohttp runs the cleanup_ctx exit (health checker, upstream connections, probe session)
    closing: list[Awaitable[None]] = [runner.cleanup()]
    if front is not None:
        closing.append(front.shutdown(CLOSE_GRACE_S))
    await asyncio.gather(*closing)
