"""`python -m bench.slowloris --port P`: many connections that trickle a request head a byte at a time.

A benchmark instrument (bench/soak.py's slowloris mode runs it as its own process, so its event loop never
slows the load generator's): it measures what such clients cost the balancer's honest users. Every connection
sends a plausible head (`POST /v1/chat/completions HTTP/1.1`, a Host, a header that never ends) one byte per
`--interval` seconds; when the balancer answers or closes one (its --header-timeout), that is counted and the
connection opened again, so the pressure stays constant. On SIGTERM it prints its counts as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import asdict, dataclass

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nX-Pad: "
CONNECT_TIMEOUT_S = 10.0
RAMP_BATCH = 50  # connections opened at once (a burst of 1,000 SYNs could overflow the listen backlog)


@dataclass
class SlowlorisStats:
    connections: int = 0  # opened, reopenings included
    cut_by_server: int = 0  # the balancer answered (e.g. 408) or closed a trickling connection
    refused: int = 0  # could not connect (e.g. over --max-connections)
    open_now: int = 0
    peak_open: int = 0


class Slowloris:
    """`count` trickling connections to host:port until cancelled; one ticker writes every next byte."""

    def __init__(self, host: str, port: int, count: int, interval: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.count = count
        self.interval = interval
        self.stats = SlowlorisStats()
        self._sent: dict[asyncio.StreamWriter, int] = {}  # open connection -> bytes of its head sent

    async def run(self, ramp_s: float = 2.0) -> None:
        tasks = [asyncio.create_task(self._ticker())]
        try:
            for i in range(self.count):
                tasks.append(asyncio.create_task(self._one()))
                if i % RAMP_BATCH == RAMP_BATCH - 1:
                    await asyncio.sleep(ramp_s * RAMP_BATCH / self.count)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self) -> None:
        while True:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError):
                self.stats.refused += 1
                await asyncio.sleep(self.interval)
                continue
            self.stats.connections += 1
            self.stats.open_now += 1
            self.stats.peak_open = max(self.stats.peak_open, self.stats.open_now)
            self._sent[writer] = 0
            try:
                with contextlib.suppress(OSError):
                    await reader.read(1024)  # the head never ends: only an answer or a close returns
                self.stats.cut_by_server += 1
            finally:
                self._sent.pop(writer, None)
                self.stats.open_now -= 1
                writer.close()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for writer, sent in list(self._sent.items()):
                if writer.is_closing():
                    continue
                with contextlib.suppress(OSError):
                    writer.write(HEAD[sent : sent + 1] if sent < len(HEAD) else b"x")
                self._sent[writer] = sent + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="balancer address")
    parser.add_argument("--port", type=int, required=True, help="balancer port")
    parser.add_argument("--connections", type=int, default=1000, help="trickling connections to hold")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two bytes")
    args = parser.parse_args(argv)
    attack = Slowloris(args.host, args.port, args.connections, args.interval)

    async def until_terminated() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        runner = asyncio.create_task(attack.run())
        await stop
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    asyncio.run(until_terminated())
    print(json.dumps(asdict(attack.stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
