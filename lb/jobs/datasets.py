"""Eval and prompt datasets: JSONL files under --datasets-dir, named by a relative `dataset_ref`.

A line is `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}`, plus `"answer"` where the reader
asks for one (eval). A reference never leaves the datasets directory: absolute paths, `..` and symlinks that
resolve outside it are refused, so a client cannot read the balancer's other files through a job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.errors import BadRequest, NotFound

ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


class DatasetError(BadRequest):
    code = "invalid_dataset"
    param = "dataset_ref"


@dataclass(frozen=True)
class Sample:
    """One dataset line; exactly one of `prompt` and `messages` is set."""

    index: int  # 0-based position in the file, which is also the sample's custom_id suffix
    prompt: str | None
    messages: list[dict[str, str]] | None
    answer: str | None

    def chat_messages(self, system: str | None = None) -> list[dict[str, str]]:
        """The sample as chat messages: a prompt becomes one user message; `system` goes first if given."""
        messages = (
            list(self.messages)
            if self.messages is not None
            else [{"role": "user", "content": self.prompt or ""}]
        )
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"index": self.index}
        if self.prompt is not None:
            record["prompt"] = self.prompt
        else:
            record["messages"] = self.messages
        if self.answer is not None:
            record["answer"] = self.answer
        return record


def resolve(datasets_dir: Path, ref: object, param: str = "dataset_ref") -> Path:
    """The file `ref` names inside `datasets_dir`; `.jsonl` may be left off. 400 on escape, 404 if absent."""
    if not isinstance(ref, str) or not ref.strip():
        raise DatasetError(
            f"{param} must be a non-empty string naming a JSONL file in the datasets directory", param=param
        )
    relative = Path(ref)
    if relative.is_absolute() or ".." in relative.parts or "\\" in ref or "\x00" in ref:
        raise DatasetError(
            f"{param} {ref!r} must be a relative name inside the datasets directory", param=param
        )
    root = datasets_dir.resolve()
    for candidate in (relative, relative.with_name(relative.name + ".jsonl")):
        path = (root / candidate).resolve()
        if not path.is_relative_to(root):  # a symlink pointing out of the directory
            raise DatasetError(f"{param} {ref!r} resolves outside the datasets directory", param=param)
        if path.is_file():
            return path
    raise NotFound(f"No dataset {ref!r} in the datasets directory.", param=param)


def read(
    path: Path,
    *,
    need_answer: bool,
    limit: int | None = None,
    max_lines: int = 1_000_000,
    param: str = "dataset_ref",
) -> list[Sample]:
    """Parse and check every line (up to `limit` samples); errors name the line number and the field."""
    samples: list[Sample] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not raw.strip():
                continue
            if number > max_lines:
                raise DatasetError(f"{path.name} has more than {max_lines} lines", param=param)
            samples.append(_sample(raw, number, len(samples), need_answer, path.name, param))
    if not samples:
        raise DatasetError(f"dataset {path.name} has no samples", param=param)
    return samples


def _sample(raw: bytes, number: int, index: int, need_answer: bool, name: str, param: str) -> Sample:
    where = f"{name} line {number}"
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc})", param=param) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: must be a JSON object", param=param)
    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise DatasetError(f"{where}: needs exactly one of 'prompt' and 'messages'", param=param)
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise DatasetError(f"{where}: 'prompt' must be a non-empty string", param=param)
    if messages is not None:
        messages = _messages(messages, where, param)
    answer = data.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if need_answer and not isinstance(answer, str):
        raise DatasetError(f"{where}: 'answer' must be a string or a number", param=param)
    return Sample(index, prompt, messages, answer if isinstance(answer, str) else None)


def _messages(value: object, where: str, param: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list", param=param)
    out = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DatasetError(
                f"{where}: messages[{i}] must be {{'role': one of {sorted(ROLES)}, 'content': str}}",
                param=param,
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out
