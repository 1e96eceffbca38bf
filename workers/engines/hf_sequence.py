"""One request inside the transformers engine's batch: its tokens, stop rules and incremental detokeniser."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from workers.engines.base import EngineRequest, FinishReason, TokenEvent
from workers.engines.hf_sampling import RowSampler
from workers.engines.stopping import StopStringMatcher

Decode = Callable[[Seq[int]], str]  # token ids -> text, special tokens skipped

# How many prompt tokens the detokeniser re-decodes as context, so that tokenizers whose pieces depend on
# their left neighbour (SentencePiece's leading space) produce the same text as decoding the whole sequence.
DETOKENIZE_CONTEXT = 5


@dataclass
class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, releasing only complete UTF-8 characters.

    The text of ids[prefix:read] was already released; decoding ids[prefix:] and subtracting it gives the new
    text, which is held back while it ends in U+FFFD (a multi-byte character split across tokens).
    """

    decode: Decode
    ids: list[int]
    prefix: int = 0
    read: int = 0

    @classmethod
    def after_prompt(cls, decode: Decode, prompt_ids: list[int]) -> IncrementalDetokenizer:
        ids = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        return cls(decode, ids, prefix=0, read=len(ids))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        released = self.decode(self.ids[self.prefix : self.read])
        full = self.decode(self.ids[self.prefix :])
        if len(full) <= len(released) or full.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(released) :]

    def flush(self) -> str:
        """Whatever is still held back (a trailing broken character comes out as U+FFFD)."""
        released = self.decode(self.ids[self.prefix : self.read])
        full = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return full[len(released) :] if len(full) > len(released) else ""


@dataclass
class SequenceState:
    """A running request: what it generated so far and whether it is done."""

    request: EngineRequest
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_total_tokens: int  # the model's context: prompt + generated may not exceed it
    matcher: StopStringMatcher = field(init=False)
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.matcher = StopStringMatcher(self.request.params.stop)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.generated)

    @property
    def total_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + self.num_generated

    @property
    def context_ids(self) -> list[int]:
        """What the KV cache must hold before the next decode step: prompt and all but the newest token."""
        return self.request.prompt_token_ids + self.generated[:-1]

    def append(self, token_id: int) -> TokenEvent:
        """Record one generated token and return the event for it (finished if a stop rule fired)."""
        params = self.request.params
        self.generated.append(token_id)
        self.sampler.observe(token_id)
        text = ""
        if token_id in self.eos_ids and not params.ignore_eos:
            self.finish_reason = "stop"
        else:
            text = self.matcher.feed(self.detokenizer.push(token_id))
            if self.matcher.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and (
            self.num_generated >= params.max_new_tokens or self.total_tokens >= self.max_total_tokens
        ):
            self.finish_reason = "length"
        if self.finish_reason is not None and not self.matcher.stopped:
            text += self.matcher.feed(self.detokenizer.flush())
            if self.matcher.stopped:
                self.finish_reason = "stop"  # the held-back tail completed a stop string
            else:
                text += self.matcher.flush()
        return TokenEvent(self.request_id, text, 1, self.finish_reason, (token_id,))
