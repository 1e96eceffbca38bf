"""JSONL files of a job (written whole, atomically) and the reading of a batch's output records."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write `records` to `path` through a temporary file and a rename: a reader never sees half a file,
    and a job finished again after a restart simply replaces it. Returns the number of records."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return count


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class Reply:
    """What one batch line came back with: the assistant's text, or why there is none."""

    text: str | None
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0


def reply_of(record: dict[str, Any]) -> Reply:
    """Read a batch output or error record (`{"custom_id", "response": {"status_code", "body"}, "error"}`)."""
    error = record.get("error")
    response = record.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    status = response.get("status_code") if isinstance(response, dict) else None
    if error or status != 200 or not isinstance(body, dict):
        message = None
        if isinstance(error, dict):
            message = f"{error.get('code')}: {error.get('message')}"
        elif isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = f"HTTP {status}: {body['error'].get('message')}"
        return Reply(None, error=message or f"HTTP {status}")
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
    except (KeyError, IndexError, TypeError):
        return Reply(None, error="the response has no choices[0].message.content")
    usage = body.get("usage") or {}
    return Reply(text or "", choice.get("finish_reason"), None, int(usage.get("completion_tokens") or 0))


def index_of(custom_id: str) -> int:
    """The sample index a job put at the end of its custom_ids (`<job id>-<phase>-<index>`)."""
    return int(custom_id.rsplit("-", 1)[1])
