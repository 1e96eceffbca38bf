"""The OpenAI shapes of files and batches, and the checks on a batch request's window and metadata."""

from __future__ import annotations

import re
from typing import Any

from lb.jobs.errors import InvalidJobRequest
from lb.jobs.run import BatchRun

WINDOW = re.compile(r"^(\d+)([smh])$")  # OpenAI accepts "24h"; shorter windows serve tests and small runs
UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_METADATA_KEYS = 16


def batch_object(row: dict[str, Any], run: BatchRun | None) -> dict[str, Any]:
    """The OpenAI batch object of a stored row; counts come from the running batch when there is one."""
    completed, failed = (run.completed, run.failed) if run else (row["completed"], row["failed"])
    tokens_in, tokens_out = (
        (run.tokens_in, run.tokens_out) if run else (row["input_tokens"], row["output_tokens"])
    )
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": row["errors"],
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
        "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"],
        "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": completed, "failed": failed},
        "usage": {
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
        },
        "metadata": row["metadata"],
    }


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


def window_seconds(window: str) -> int:
    match = WINDOW.match(window or "")
    if not match or int(match.group(1)) <= 0:
        raise InvalidJobRequest(
            f"completion_window {window!r} must be a duration such as '24h' (or '30m', '90s').",
            code="invalid_completion_window",
            param="completion_window",
        )
    return int(match.group(1)) * UNITS[match.group(2)]


def check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_KEYS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidJobRequest(
            f"metadata must map at most {MAX_METADATA_KEYS} string keys to string values.",
            code="invalid_metadata",
            param="metadata",
        )
