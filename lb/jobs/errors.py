"""The jobs part's named errors; lb/errors.py turns each into its OpenAI-style JSON response."""

from __future__ import annotations

from lb.errors import BadRequest, BodyTooLarge, NotFound


class InvalidJobRequest(BadRequest):
    """A files / batches request the balancer refuses; `code` names the rule it broke."""

    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        if code is not None:
            self.code = code


class FileTooLarge(BodyTooLarge):
    code = "file_too_large"
    param = "file"


class FileNotFound(NotFound):
    code = "file_not_found"


class BatchNotFound(NotFound):
    code = "batch_not_found"
