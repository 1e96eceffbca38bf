"""The request body: read whole when small (so an attempt can be retried) or streamed when large, and its
`model`, read only when backends serve different models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from lb.errors import BadRequest, BodyTooLarge
from lb.work import parse_payload

BUFFER_LIMIT = 1 << 20  # bytes: bodies up to this are read whole and can be retried on another backend


async def read_body(request: web.Request, limit: int, *, whole: bool) -> bytes | AsyncIterator[bytes] | None:
    """None without a body; bytes when small or `whole`; else an iterator that streams it through (once)."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"Request body of {length} bytes exceeds the limit of {limit} bytes.")
    if length is not None and length <= BUFFER_LIMIT:
        return await request.read()
    if whole:
        return await _read_bounded(request.content, limit)
    return _stream_bounded(request.content, limit)


def model_of(body: bytes) -> str | None:
    """The request's `model`; 400 when the body is not a JSON object."""
    return model_in(parse_payload(body)) if body else None


def model_in(payload: dict[str, Any]) -> str | None:
    """The parsed body's `model`; 400 when it is not a string."""
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string.", param="model")
    return model


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream_bounded(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        yield chunk
