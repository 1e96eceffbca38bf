"""Check a batch input file before anything runs: every line, all or nothing (run in a thread: files are big).

Each error names the 1-based line and the field, with a code a client can match on:
empty_file, file_too_large, too_many_lines, line_too_large, invalid_json_line, invalid_line,
missing_custom_id, duplicate_custom_id, invalid_method, mismatched_url, invalid_body, missing_model,
model_not_found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from lb.model_routing import normalise

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_ERRORS = 100  # validation stops collecting after this many: the client fixes the file and retries


class LineError(TypedDict):
    code: str
    message: str
    param: str | None
    line: int | None


@dataclass(frozen=True)
class Limits:
    max_lines: int
    max_file_size: int  # bytes
    max_line_size: int  # bytes: one line is one request body, so the proxy's --max-body-size


def error(code: str, message: str, param: str | None = None, line: int | None = None) -> LineError:
    return {"code": code, "message": message, "param": param, "line": line}


def validate_file(
    path: Path, endpoint: str, limits: Limits, served: frozenset[str] | None
) -> tuple[int, list[LineError]]:
    """(number of request lines, errors). `served`: normalised model names the workers serve, or None when
    no worker announces its models (then any model is accepted)."""
    size = path.stat().st_size
    if size > limits.max_file_size:
        return 0, [
            error("file_too_large", f"The file has {size} bytes; the limit is {limits.max_file_size}.")
        ]
    errors: list[LineError] = []
    seen: set[str] = set()
    count = 0
    with open(path, "rb") as lines:
        number = 0
        while len(errors) < MAX_ERRORS:
            raw = lines.readline(limits.max_line_size + 2)
            if not raw:
                break
            number += 1
            if len(raw) > limits.max_line_size + 1 or (len(raw) > limits.max_line_size and raw[-1:] != b"\n"):
                errors.append(
                    error(
                        "line_too_large",
                        f"Line {number} is longer than {limits.max_line_size} bytes.",
                        None,
                        number,
                    )
                )
                _skip_rest(lines, raw)
                continue
            if not raw.strip():
                continue
            count += 1
            if count > limits.max_lines:
                errors.append(
                    error(
                        "too_many_lines",
                        f"The file has more than {limits.max_lines} requests (--batch-max-lines).",
                        None,
                        number,
                    )
                )
                break
            problem = check_line(raw, number, endpoint, served, seen)
            if problem is not None:
                errors.append(problem)
    if not errors and count == 0:
        errors.append(error("empty_file", "The file holds no request lines."))
    return count, errors


def check_line(
    raw: bytes, number: int, endpoint: str, served: frozenset[str] | None, seen: set[str]
) -> LineError | None:
    try:
        item: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return error("invalid_json_line", f"Line {number} is not valid JSON: {exc}", None, number)
    if not isinstance(item, dict):
        return error("invalid_line", f"Line {number} is not a JSON object.", None, number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return error(
            "missing_custom_id",
            f"Line {number}: 'custom_id' must be a non-empty string.",
            "custom_id",
            number,
        )
    if custom_id in seen:
        return error(
            "duplicate_custom_id",
            f"Line {number}: custom_id {custom_id!r} appears more than once.",
            "custom_id",
            number,
        )
    seen.add(custom_id)
    if item.get("method") != "POST":
        return error("invalid_method", f"Line {number}: 'method' must be \"POST\".", "method", number)
    if item.get("url") != endpoint:
        return error(
            "mismatched_url",
            f"Line {number}: 'url' is {item.get('url')!r} but the batch's endpoint is {endpoint!r}.",
            "url",
            number,
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return error("invalid_body", f"Line {number}: 'body' must be a JSON object.", "body", number)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(
            "missing_model", f"Line {number}: 'body.model' must be a non-empty string.", "body.model", number
        )
    if served is not None and normalise(model) not in served:
        return error(
            "model_not_found", f"Line {number}: no worker serves the model {model!r}.", "body.model", number
        )
    return None


def _skip_rest(lines: Any, raw: bytes) -> None:
    """Read past the rest of an over-long line, a bounded piece at a time."""
    while raw and raw[-1:] != b"\n":
        raw = lines.readline(1 << 20)
