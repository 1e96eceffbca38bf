"""Credentials never reach the balancer's log: every record is scrubbed before any handler writes it.

The balancer itself never logs a key, but libraries do: aiohttp dumps the offending header line of a malformed
request at ERROR (`b'Authorization: Bearer KEY\\x01'`), and a traceback may hold a header in a local's repr.
So instead of trusting every call site, one filter on the root handlers rewrites each record's message and
traceback: the configured keys and admin token anywhere, and any `Bearer <token>`, `Authorization: <value>`
or `X-API-Key: <value>` (a wrong key is someone's secret too).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "***"
# a header value as it appears in a log: raw, in a bytes repr (ends at a quote or an escape) or in a dict repr
_VALUE = r"[^\s'\"\\,;)}\]]+"
_PATTERNS = (
    re.compile(r"(?i)\b(bearer\s+)" + _VALUE),
    re.compile(r"(?i)\b((?:authorization|x-api-key|api[-_]key)['\"]?\s*[:=,]\s*b?['\"]?)[^'\"\\\r\n]+"),
)


class Redactor(logging.Filter):
    """A handler filter: the record's text (message, traceback, stack) with every credential masked."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # longest first, so a key that contains another is masked whole
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._formatter = logging.Formatter()

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(r"\1" + MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install(secrets: Iterable[str]) -> Redactor:
    """Scrub every record that reaches the root logger's handlers (call after logging.basicConfig)."""
    redactor = Redactor(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    return redactor
