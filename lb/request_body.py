"""The request body, received whole (within --max-body-size) before the request takes a worker slot, so a
slow uploader holds no worker capacity and any attempt can be retried; and its `model`, read only when
backends serve different models."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from lb.errors import BadRequest, BodyTooLarge
from lb.work import parse_payload


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """None without a body, else all of it (Content-Length or chunked); 413 beyond `limit` bytes."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"Request body of {length} bytes exceeds the limit of {limit} bytes.")
    if length is not None:
        return await request.read()
    return await _read_bounded(request.content, limit)


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
