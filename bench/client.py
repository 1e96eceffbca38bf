"""The load generator every benchmark shares: closed or open loop, chat or completions, streaming or not.

It talks raw HTTP through one aiohttp session rather than the `openai` SDK: on a 2-core machine the client
competes with the system under test, and the SDK (httpx + pydantic models per chunk) cost ~10x the client CPU:
measured against a local stub, 32-token completions at concurrency 16, 3.3 ms vs 0.32 ms per request, and
10.9 ms vs 0.86 ms streamed (2026-11-22). Streams are not parsed event by event: TTFT is the arrival of the
first body bytes and the token count comes from the final `usage` event (`stream_options.include_usage`),
falling back to the number of content events.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from bench.summary import Summary, summarize

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# Common English words: with byte-level BPE tokenizers each is about one token after a space.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an are this be which or had not "
    "but first one their were all new also its time after two has they when been who year other more "
    "city some into there world these most school over only many would between used while she can "
    "where made three under state during such then before about him them through family known since"
)
_WORDS = _WORD_TEXT.split()


def synthetic_prompt(index: int, prompt_len: int) -> str:
    """A deterministic prompt of `prompt_len` words (≈ tokens); request `index` gets its own word order."""
    rng = random.Random(index)
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, prompt_len)))


@dataclass(frozen=True)
class LoadSpec:
    """What to send and how hard. Closed loop unless `rate` is set (then Poisson arrivals, open loop)."""

    url: str
    endpoint: Endpoint = "completions"
    model: str | None = None
    stream: bool = False
    max_tokens: int = 64
    prompt_len: int = 32
    ignore_eos: bool = False
    api_key: str | None = None
    concurrency: int = 10  # closed loop: requests in flight; open loop: a cap (0 = none)
    num_requests: int | None = 50  # stop after this many (None = only `duration` limits)
    duration: float | None = None  # seconds; stop starting new requests after this
    rate: float | None = None  # requests/s for open loop
    timeout: float = 300.0  # seconds without a response byte before a request counts as failed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, not {self.endpoint!r}")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give num_requests or duration (or both)")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.concurrency < (0 if self.rate else 1):
            raise ValueError("concurrency must be >= 1 (>= 0 with rate)")
        if self.max_tokens < 1 or self.prompt_len < 1:
            raise ValueError("max_tokens and prompt_len must be >= 1")

    def body(self, index: int) -> bytes:
        prompt = synthetic_prompt(index + self.seed * 1_000_003, self.prompt_len)
        payload: dict[str, Any] = {"max_tokens": self.max_tokens, "stream": self.stream}
        if self.model is not None:
            payload["model"] = self.model
        if self.endpoint == "chat":
            payload["messages"] = [{"role": "user", "content": prompt}]
        else:
            payload["prompt"] = prompt
        if self.stream:
            payload["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            payload["ignore_eos"] = True
        return json.dumps(payload).encode()


@dataclass
class RequestResult:
    """One request's outcome. Times are seconds; `started` is on the run's monotonic clock (0 = run start)."""

    index: int
    ok: bool
    status: int | None  # HTTP status, None when no response arrived
    started: float
    latency: float
    ttft: float | None = None  # streaming only: first event carrying text
    output_tokens: int = 0
    error_kind: str | None = None  # e.g. "http_429", "timeout", "connect", "disconnect", "stream_error"
    error_message: str | None = None
    worker: str | None = None  # the balancer's X-LB-Worker header


@dataclass
class LoadRun:
    spec: LoadSpec
    results: list[RequestResult]
    wall_time: float  # seconds from the first request sent to the last one finished
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        self.summary = summarize(self.results, self.wall_time)


OnResult = Callable[[RequestResult], None]


class LoadClient:
    """Sends requests per a LoadSpec over one pooled aiohttp session; `run()` returns every result."""

    def __init__(self, spec: LoadSpec, on_result: OnResult | None = None) -> None:
        self.spec = spec
        self.on_result = on_result
        self._target = spec.url.rstrip("/") + ENDPOINT_PATHS[spec.endpoint]
        self._headers = {"Content-Type": "application/json"}
        if spec.api_key:
            self._headers["Authorization"] = f"Bearer {spec.api_key}"
        self._results: list[RequestResult] = []
        self._t0 = 0.0

    async def run(self) -> LoadRun:
        limit = self.spec.concurrency if self.spec.rate is None else 0
        connector = aiohttp.TCPConnector(limit=limit, force_close=False, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.spec.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._t0 = time.perf_counter()
            if self.spec.rate is None:
                await self._closed_loop(session)
            else:
                await self._open_loop(session)
            wall = time.perf_counter() - self._t0
        self._results.sort(key=lambda r: r.index)
        return LoadRun(self.spec, self._results, wall)

    def _more(self, sent: int) -> bool:
        spec = self.spec
        if spec.num_requests is not None and sent >= spec.num_requests:
            return False
        return spec.duration is None or time.perf_counter() - self._t0 < spec.duration

    async def _closed_loop(self, session: aiohttp.ClientSession) -> None:
        sent = 0

        async def user() -> None:
            nonlocal sent
            while self._more(sent):
                index, sent = sent, sent + 1  # no await in between: indices are unique
                await self._one(session, index)

        await asyncio.gather(*(user() for _ in range(self.spec.concurrency)))

    async def _open_loop(self, session: aiohttp.ClientSession) -> None:
        assert self.spec.rate is not None
        rng = random.Random(self.spec.seed)
        cap = asyncio.Semaphore(self.spec.concurrency) if self.spec.concurrency else None
        tasks: set[asyncio.Task[None]] = set()
        next_at = time.perf_counter()
        sent = 0
        while self._more(sent):
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if cap is not None:
                await cap.acquire()
            task = asyncio.create_task(self._one(session, sent))
            if cap is not None:
                task.add_done_callback(lambda _t: cap.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            next_at += rng.expovariate(self.spec.rate)
        if tasks:
            await asyncio.gather(*tasks)

    def _record(self, result: RequestResult) -> None:
        self._results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    async def _one(self, session: aiohttp.ClientSession, index: int) -> None:
        start = time.perf_counter()
        result = RequestResult(index=index, ok=False, status=None, started=start - self._t0, latency=0.0)
        try:
            async with session.post(self._target, data=self.spec.body(index), headers=self._headers) as resp:
                result.status = resp.status
                result.worker = resp.headers.get("X-LB-Worker")
                if resp.status != 200:
                    await self._read_error(resp, result)
                elif self.spec.stream:
                    await self._read_stream(resp, result, start)
                else:
                    await self._read_json(resp, result)
        except TimeoutError:
            result.error_kind, result.error_message = "timeout", f"no data for {self.spec.timeout}s"
        except aiohttp.ClientConnectorError as exc:
            result.error_kind, result.error_message = "connect", str(exc)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            result.error_kind, result.error_message = "disconnect", str(exc) or type(exc).__name__
        except aiohttp.ClientError as exc:
            result.error_kind, result.error_message = "client_error", f"{type(exc).__name__}: {exc}"
        result.latency = time.perf_counter() - start
        result.ok = result.error_kind is None
        self._record(result)

    @staticmethod
    async def _read_error(resp: aiohttp.ClientResponse, result: RequestResult) -> None:
        result.error_kind = f"http_{resp.status}"
        text = await resp.text(errors="replace")
        try:
            result.error_message = str(json.loads(text)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            result.error_message = text[:200]

    @staticmethod
    async def _read_json(resp: aiohttp.ClientResponse, result: RequestResult) -> None:
        try:
            data = json.loads(await resp.read())
            result.output_tokens = int(data["usage"]["completion_tokens"])
        except (ValueError, KeyError, TypeError) as exc:
            result.error_kind, result.error_message = "bad_response", f"no usage in response: {exc!r}"

    @staticmethod
    async def _read_stream(resp: aiohttp.ClientResponse, result: RequestResult, start: float) -> None:
        """SSE `data: {...}` events ending with `data: [DONE]`. The body is gathered as it arrives and split
        into events once at the end (cheaper than iterating lines asynchronously). Events are parsed only
        until the first one carrying text (TTFT; a chat stream opens with a role-only event) and for the
        last one, which carries `usage`."""
        body = bytearray()
        scanned = 0  # bytes of `body` already searched for the first text
        async for block in resp.content.iter_any():
            body += block
            if result.ttft is None:
                end = body.rfind(b"\n") + 1
                if end > scanned:
                    if _has_text(bytes(body[scanned:end])):
                        result.ttft = time.perf_counter() - start
                    scanned = end
        content_chunks = 0
        last = b""
        done = False
        for raw in bytes(body).split(b"\n"):
            if not raw.startswith(b"data:"):
                continue
            data = raw[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            if data.startswith(b'{"error"'):
                result.error_kind, result.error_message = "stream_error", data.decode(errors="replace")[:200]
                return
            last = data
            # The usage-only event has an empty choices list; every other event carries content.
            if b'"choices":[]' not in data and b'"choices": []' not in data:
                content_chunks += 1
        if not done:
            result.error_kind, result.error_message = "disconnect", "stream ended without [DONE]"
            return
        result.output_tokens = content_chunks
        try:
            usage = json.loads(last).get("usage") if last else None
            if usage:
                result.output_tokens = int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # the event count stands in for the token count


def _has_text(lines: bytes) -> bool:
    """Whether any complete SSE event in `lines` carries generated text (completions or chat delta)."""
    for line in lines.split(b"\n"):
        if not line.startswith(b"data:") or line[5:].strip() in (b"[DONE]", b""):
            continue
        try:
            choices = json.loads(line[5:]).get("choices") or []
        except (ValueError, AttributeError):
            return True  # not ours to judge: count it as the first output
        for choice in choices:
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                return True
    return False


async def run_load(spec: LoadSpec, on_result: OnResult | None = None) -> LoadRun:
    """Run one load pattern to completion; `on_result` is called as each request finishes (progress bars)."""
    return await LoadClient(spec, on_result).run()
