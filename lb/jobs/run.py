"""BatchRun: one running batch's lines still to send, its result files, and why it stops (if it does)."""

from __future__ import annotations

import json
import logging
import secrets
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.jobs.results import ResultFile, usage_of
from lb.jobs.sender import Outcome

log = logging.getLogger("lb.jobs")


@dataclass
class Line:
    custom_id: str
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None


class BatchRun:
    """Lines are read lazily from the input file (validated already), skipping those with a result."""

    def __init__(
        self, batch_id: str, endpoint: str, input_path: Path, output: Path, errors: Path, expires_at: int
    ) -> None:
        self.batch_id = batch_id
        self.endpoint = endpoint
        self.total = 0  # lines in the input file (set from the batch's row)
        self.saved: tuple[int, int, int, int] = (-1, -1, -1, -1)  # progress last written to the database
        self.expires_at = expires_at
        self.output = ResultFile(output)
        self.errors = ResultFile(errors)
        self.done: set[str] = set()
        self.tokens_in = self.tokens_out = 0
        for results in (self.output, self.errors):
            tokens_in, tokens_out = results.recover(self.done)
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
        self._input_path = input_path
        self._lines: Iterator[Line] | None = None
        self._returned: deque[Line] = deque()  # lines taken but not sent (no slot), sent first next time
        self.exhausted = False  # every line has been taken
        self.in_flight = 0
        self.stopping: str | None = None  # "cancelled" | "expired": take no more lines

    @property
    def completed(self) -> int:
        return self.output.count

    @property
    def failed(self) -> int:
        return self.errors.count

    @property
    def wants_lines(self) -> bool:
        return self.stopping is None and not self.exhausted

    def take(self) -> Line | None:
        """The next line without a result, or None (and `exhausted`) when there is none."""
        if self._returned:
            return self._returned.popleft()
        if self._lines is None:
            self._lines = self._read()
        line = next(self._lines, None)
        if line is None:
            self.exhausted = True
        return line

    def give_back(self, line: Line) -> None:
        self._returned.append(line)

    def remaining(self) -> Iterator[Line]:
        """Every line not yet taken (for expiry), then the file is done."""
        while (line := self.take()) is not None:
            yield line

    def _read(self) -> Iterator[Line]:
        with open(self._input_path, "rb") as lines:
            for raw in lines:
                if not raw.strip():
                    continue
                try:
                    item = json.loads(raw)
                    item["custom_id"], item["body"]
                except (ValueError, KeyError, TypeError):
                    log.error(
                        "batch %s: skipping a malformed input line (the file changed after validation)",
                        self.batch_id,
                    )
                    continue
                if item["custom_id"] in self.done:
                    continue
                yield Line(item["custom_id"], item["body"])

    def record(self, line: Line, outcome: Outcome) -> None:
        """Append the line's result: a 2xx response to the output file, anything else to the error file."""
        response = None
        if outcome.status is not None:
            response = {
                "status_code": outcome.status,
                "request_id": f"req_{secrets.token_hex(12)}",
                "body": outcome.body,
            }
        record: dict[str, Any] = {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": line.custom_id,
            "response": response,
            "error": None,
        }
        self.done.add(line.custom_id)
        if outcome.ok:
            tokens_in, tokens_out = usage_of(record)
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.output.append(record)
            return
        record["error"] = _error_of(outcome)
        self.errors.append(record)

    def expire(self, line: Line) -> None:
        self.done.add(line.custom_id)
        self.errors.append(
            {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": line.custom_id,
                "response": None,
                "error": {
                    "code": "batch_expired",
                    "message": "This line was not run before the batch's completion window ended.",
                },
            }
        )

    def flush(self) -> None:
        self.output.flush()
        self.errors.flush()

    def close(self) -> None:
        self.output.close()
        self.errors.close()
        if self._lines is not None:
            self._lines.close()  # type: ignore[attr-defined]  # a generator: closes the input file


def _error_of(outcome: Outcome) -> dict[str, Any]:
    if outcome.status is None:
        return {
            "code": outcome.body.get("code", "worker_failed"),
            "message": f"{outcome.body.get('message')} (after {outcome.attempts} attempts)",
        }
    inner = outcome.body.get("error") if isinstance(outcome.body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return {
        "code": code or f"http_{outcome.status}",
        "message": message or f"The worker answered {outcome.status}.",
    }
