"""Work: what routing knows of one request beyond its path, read from headers and body only when asked.

Round robin and least connections ask for nothing, so their requests get `PLAIN` and the body stays unread.
The other readers (affinity policies, least_tokens, rate limits, the response cache) share one JSON parse.
Token counts here are estimates, never tokenizer output: the whole request body in bytes / 4 for the prompt
(JSON punctuation included: cheap, and proportional to the prompt), plus the requested `max_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lb.errors import BadRequest

BYTES_PER_TOKEN = 4  # the prompt estimate: request body bytes / 4
DEFAULT_MAX_TOKENS = 256  # counted for a request that sets no max_tokens (the engine's own limit is unknown)


@dataclass(frozen=True, slots=True)
class Work:
    key: str | None = None  # affinity key: the prompt's prefix text or a session id; None = no preference
    tokens: int = 0  # estimated prompt + max_tokens (BYTES_PER_TOKEN), for least_tokens and --rate-limit-tpm
    payload: dict[str, Any] | None = None  # the parsed body, when something needed it


PLAIN = Work()  # a request whose body nobody needs to read


def parse_payload(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 otherwise."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return payload


def estimate_tokens(body: bytes, payload: dict[str, Any]) -> int:
    """Prompt estimate (body bytes / 4) plus the tokens the request may generate."""
    limit = payload.get("max_tokens", payload.get("max_completion_tokens"))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        limit = DEFAULT_MAX_TOKENS
    n = payload.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return len(body) // BYTES_PER_TOKEN + limit * choices


def prefix_text(payload: dict[str, Any], limit: int) -> str | None:
    """The first `limit` characters of the prompt: chat messages' roles and text in order, or `prompt`."""
    messages = payload.get("messages")
    parts: list[str] = []
    size = 0
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            text = _content_text(message.get("content"))
            parts.append(f"{message.get('role')}:{text}\n")
            size += len(parts[-1])
            if size >= limit:
                break
    else:
        prompt = payload.get("prompt", payload.get("input"))
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if isinstance(prompt, str):
            parts.append(prompt)
        elif isinstance(prompt, list):  # token ids: their text is unknown, their values do as well
            parts.append(",".join(map(str, prompt[:limit])))
    text = "".join(parts)[:limit]
    return text or None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip() or None
    return None


def _peek(body: bytes) -> dict[str, Any] | None:
    """The parsed body, or None when it is no JSON object: routing only peeks, the worker judges the body."""
    try:
        return parse_payload(body)
    except BadRequest:
        return None


class WorkReader:
    """Builds a request's Work from what its readers asked for: `prefix`, `session`, `tokens`, `payload`."""

    def __init__(self, needs: frozenset[str], prefix_chars: int, session_header: str) -> None:
        self.needs = needs
        self._prefix_chars = prefix_chars
        self._session_header = session_header.lower().encode()

    def read(
        self, headers: Sequence[tuple[bytes, bytes]], body: bytes | None, payload: dict[str, Any] | None
    ) -> Work:
        """`payload` is the parsed body when the caller already has it; bodies are parsed at most once."""
        needs = self.needs
        key: str | None = None
        if "session" in needs:
            key = header(headers, self._session_header)
            if key is None and body:
                payload = payload if payload is not None else _peek(body)
                user = payload.get("user") if payload is not None else None
                key = user if isinstance(user, str) and user else None
        if not body:
            return Work(key=key)
        if payload is None and needs & {"prefix", "tokens", "payload"}:
            payload = _peek(body)
        if payload is None:
            return Work(key=key)
        if "prefix" in needs:
            key = prefix_text(payload, self._prefix_chars)
        tokens = estimate_tokens(body, payload) if "tokens" in needs else 0
        return Work(key=key, tokens=tokens, payload=payload)
