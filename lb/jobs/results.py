"""A batch's output and error files: records appended as lines complete, written in chunks, recovered.

The files are the truth about which lines are done. A record is buffered, then written with one `write` per
chunk (every FLUSH_LINES records, or when the dispatcher's tick flushes); a balancer killed before a chunk is
written loses only those results, and those lines are sent again after the restart. `recover` cuts off a
half-written last line, so each custom_id appears exactly once across both files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLUSH_LINES = 64


class ResultFile:
    """One append-only JSONL file (output or errors) and what it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._pending: list[bytes] = []
        self._fd: int | None = None

    def recover(self, done: set[str]) -> tuple[int, int]:
        """Truncate a torn last line, add every custom_id to `done`; returns (input, output) tokens seen."""
        tokens_in = tokens_out = 0
        if not self.path.exists():
            return 0, 0
        keep = 0
        with open(self.path, "rb") as lines:
            for raw in lines:
                if not raw.endswith(b"\n"):
                    break  # the balancer died inside this write
                try:
                    record = json.loads(raw)
                except ValueError:
                    break
                keep += len(raw)
                done.add(record["custom_id"])
                self.count += 1
                usage = usage_of(record)
                tokens_in += usage[0]
                tokens_out += usage[1]
        if keep != self.path.stat().st_size:
            os.truncate(self.path, keep)
        return tokens_in, tokens_out

    def append(self, record: dict[str, Any]) -> None:
        self._pending.append(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.count += 1
        if len(self._pending) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of a result file (a line still being written is left out)."""
    if not path.exists():
        return
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.endswith(b"\n"):
                yield json.loads(raw)


def usage_of(record: dict[str, Any]) -> tuple[int, int]:
    response = record.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
