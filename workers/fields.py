"""Typed, range-checked reads of a JSON object's optional fields; every failure is a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

from workers.errors import InvalidRequest


class Fields:
    """Typed, range-checked reads of optional fields; every failure is a 400 naming the field."""

    def __init__(self, body: dict[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def _get(self, key: str) -> Any:
        return self.body.get(key)

    def _bad(self, key: str, what: str) -> InvalidRequest:
        return InvalidRequest(f"{self.prefix}{key} must be {what}, got {json.dumps(self._get(key))}",
                              param=self.prefix + key)

    def string(self, key: str, default: str | None) -> str | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def integer(
        self, key: str, default: Any, *, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, "an integer")
        if minimum is not None and value < minimum:
            raise self._bad(key, f"at least {minimum}")
        if maximum is not None and value > maximum:
            raise self._bad(key, f"at most {maximum}")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float | None = None,
               exclusive_minimum: bool = False) -> float:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(key, "a number")
        if value < minimum or (exclusive_minimum and value == minimum):
            raise self._bad(key, f"{'greater than' if exclusive_minimum else 'at least'} {minimum}")
        if maximum is not None and value > maximum:
            raise self._bad(key, f"at most {maximum}")
        return float(value)
