"""Reading a job or /solve request body: typed fields, unknown keys refused, every 400 naming its field.

`lb` does not import `workers`, so the balancer's job endpoints have this small reader of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lb.errors import BadRequest


class InvalidField(BadRequest):
    code = "invalid_value"


class MissingField(BadRequest):
    code = "missing_required_parameter"


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(await request.read() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


class Fields:
    """One JSON object's fields; `prefix` names a nested object in messages (e.g. `config.`)."""

    def __init__(self, body: dict[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidField(
                f"Unknown field {prefix}{unknown[0]!r}; accepted: {', '.join(sorted(allowed))}",
                param=prefix + unknown[0],
            )

    def _bad(self, key: str, what: str) -> InvalidField:
        shown = json.dumps(self.body.get(key))[:80]
        return InvalidField(f"{self.prefix}{key} must be {what}, got {shown}", param=self.prefix + key)

    def required_string(self, key: str) -> str:
        value = self.body.get(key)
        if value is None:
            raise MissingField(f"{self.prefix}{key} is required", param=self.prefix + key)
        if not isinstance(value, str) or not value.strip():
            raise self._bad(key, "a non-empty string")
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def integer(self, key: str, default: int | None, minimum: int, maximum: int | None = None) -> int | None:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            raise self._bad(key, f"an integer from {minimum}" + (f" to {maximum}" if maximum else " up"))
        return value

    def number(self, key: str, default: float | None, minimum: float, maximum: float) -> float | None:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
            raise self._bad(key, f"a number from {minimum:g} to {maximum:g}")
        return float(value)

    def strings(self, key: str, default: list[str] | None) -> list[str] | None:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self._bad(key, "a non-empty list of non-empty strings")
        return list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.body.get(key, {})
        if not isinstance(value, dict):
            raise self._bad(key, "a JSON object")
        return value


GENERATION_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "seed", "system_prompt"})


@dataclass(frozen=True)
class Generation:
    """Sampling settings a job or /solve request passes on to every chat completion it sends."""

    max_tokens: int
    temperature: float
    top_p: float | None = None
    seed: int | None = None
    system_prompt: str | None = None

    @classmethod
    def read(
        cls, fields: Fields, max_tokens: int, temperature: float, system: str | None = None
    ) -> Generation:
        return cls(
            max_tokens=fields.integer("max_tokens", max_tokens, 1, 1 << 20) or max_tokens,
            temperature=fields.number("temperature", temperature, 0.0, 2.0) or 0.0,
            top_p=fields.number("top_p", None, 0.0, 1.0),
            seed=fields.integer("seed", None, 0),
            system_prompt=fields.string("system_prompt", system),
        )

    def body(
        self, model: str | None, messages: list[dict[str, str]], seed: int | None = None
    ) -> dict[str, Any]:
        """A /v1/chat/completions body; `seed` (per line) overrides the request's."""
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if model is not None:
            body["model"] = model
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if seed is not None or self.seed is not None:
            body["seed"] = seed if seed is not None else self.seed
        return body

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}
