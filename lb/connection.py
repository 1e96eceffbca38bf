"""Connection: one keep-alive HTTP/1.1 connection to a worker, as an asyncio.Protocol with a read buffer.

`data_received` only appends to the buffer and wakes the coroutine waiting in `wait_data`; parsing happens
on the coroutine side (lb/response.py). Reading pauses past MAX_BUFFER: a slow client slows its worker.
"""

from __future__ import annotations

import asyncio
import typing
from typing import Any

MAX_BUFFER = 1 << 20  # bytes read ahead from a worker before we stop reading from its socket
INF = float("inf")


class UpstreamError(Exception):
    """The worker could not be reached or broke the connection. `sent` says whether it may have seen the
    whole request; `started` whether any response byte arrived."""

    def __init__(self, message: str, *, connect: bool = False, started: bool = False) -> None:
        super().__init__(message)
        self.connect = connect
        self.started = started


class UpstreamTimeout(UpstreamError):
    """Connect timeout (connect=True) or the worker stayed silent longer than the read timeout."""


class Connection(asyncio.Protocol):
    """One keep-alive TCP connection; the coroutine side parses what `data_received` buffers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.response: Any = None  # its UpstreamResponse (lb/response.py), reused with its parser
        self._exc: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._got_data = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        # one lazy read timer per connection: `wait_data` moves the deadline (an attribute) and arms the
        # timer only when it would fire too late, instead of arming and cancelling one per wait (a TimerHandle
        # and a heap entry for every response and every streamed piece)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = INF  # INF: nobody waits for data

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._got_data = True
        if len(self.buffer) > MAX_BUFFER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self._exc = exc or ConnectionResetError("connection closed by the worker")
        for waiter in (self._waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # coroutine side
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
        if self.closed:
            raise UpstreamError(f"worker closed the connection while receiving the request: {self._exc}")

    async def wait_data(self, timeout: float, started: bool) -> None:  # noqa: ASYNC109
        """Wait for more bytes; raise at EOF (UpstreamError) or after `timeout` s of silence."""
        if self.closed:
            raise UpstreamError(f"connection to the worker lost: {self._exc!r}", started=started)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._got_data = False
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        at = self._deadline = loop.time() + timeout
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = loop.call_at(at, self._expire), at
        try:
            await waiter
        finally:
            self._waiter = None
            self._deadline = INF
        if self._got_data:
            return
        if self.closed:
            raise UpstreamError(f"connection to the worker lost: {self._exc!r}", started=started)
        raise UpstreamTimeout(f"the worker sent nothing for {timeout:g}s", started=started)

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def _expire(self) -> None:
        self._timer = None
        if self._deadline == INF:
            return  # nobody waits: the timer lapses until the next wait arms one
        if self._loop.time() < self._deadline:  # the deadline moved on since the timer was armed
            self._timer, self._timer_at = self._loop.call_at(self._deadline, self._expire), self._deadline
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # wakes wait_data without new data: a read timeout

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
