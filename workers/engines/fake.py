"""A fake engine: deterministic text, no model files, and a latency model that imitates a batching GPU.

It exists to test and benchmark the balancer with many workers on a 2-core machine; it is never a stand-in
for the real engine. Rules a test may rely on:
- a "token" is one word with a leading space, drawn from a fixed word list by a generator seeded with the
  prompt (greedy, i.e. temperature 0) or with prompt + seed (sampling with a seed); sampling without a seed
  is random. The same prompt and parameters always give the same text.
- a prompt counts one token per whitespace-separated word (at least one).
- unless `ignore_eos`, one prompt in eight (by a hash of the prompt) ends with EOS (finish_reason "stop")
  after a prompt-dependent 8-39 tokens; `fake_eos_position(prompt)` says where (None = never).
- time per decode step = step_latency + per_seq_latency * running sequences, plus prefill_latency once per
  batch and once per group of requests admitted into a running batch (continuous batching).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from workers.engines.base import EngineInfo, EngineRequest, PromptTooLongError, TokenEvent
from workers.engines.stopping import StopStringMatcher

WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
    "whiskey", "xray", "yankee", "zulu", "red", "orange", "yellow", "green", "blue", "indigo", "violet",
    "river", "mountain", "forest", "desert", "ocean", "cloud", "stone", "silver", "copper",
)
DEFAULT_MAX_MODEL_LEN = 4096
FAKE_EOS_ID = len(WORDS)  # token ids: a word's index in WORDS, or this for EOS


def _digest(text: str) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def fake_eos_position(prompt: str) -> int | None:
    """The 1-based generated-token index at which the fake engine emits EOS for `prompt`, or None."""
    h = _digest("eos:" + prompt)
    return 8 + (h >> 3) % 32 if h % 8 == 0 else None


def fake_prompt_tokens(prompt: str) -> list[int]:
    return [_digest(word) % 50_000 for word in prompt.split()] or [0]


@dataclass
class _Sequence:
    """One running request inside the fake batch."""

    request: EngineRequest
    rng: random.Random
    matcher: StopStringMatcher
    eos_at: int | None
    generated: int = 0

    def step(self) -> TokenEvent:
        self.generated += 1
        rid = self.request.request_id
        if self.eos_at is not None and self.generated >= self.eos_at:
            # EOS is a token but adds no text
            return TokenEvent(rid, self.matcher.flush(), 1, "stop", (FAKE_EOS_ID,))
        word = self.rng.randrange(len(WORDS))
        text = self.matcher.feed(" " + WORDS[word])
        if self.matcher.stopped:
            return TokenEvent(rid, text, 1, "stop", (word,))
        if self.generated >= self.request.params.max_new_tokens:
            return TokenEvent(rid, text + self.matcher.flush(), 1, "length", (word,))
        return TokenEvent(rid, text, 1, None, (word,))


@dataclass
class FakeEngine:
    """Implements the Engine protocol without a model. Latencies are in seconds."""

    served_model_name: str = "fake-model"
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = 8  # how many sequences may join while others run (a fresh batch is not limited)
    load_latency: float = 0.0
    prefill_latency: float = 0.0
    step_latency: float = 0.0
    per_seq_latency: float = 0.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _running: list[_Sequence] = field(default_factory=list, init=False, repr=False)
    _prefill_due: bool = field(default=False, init=False, repr=False)  # sequences joined since the last step
    _suspended: dict[str, _Sequence] = field(default_factory=dict, init=False, repr=False)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("fake", self.served_model_name, "cpu", self.max_model_len)

    def load(self) -> None:
        """Nothing to load; waits `load_latency` to imitate loading weights."""
        self._wait(self.load_latency)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def prepare(self, request: EngineRequest) -> None:
        request.prompt_token_ids = fake_prompt_tokens(request.prompt)
        needed = len(request.prompt_token_ids) + request.params.max_new_tokens
        if needed > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(request.prompt_token_ids)} prompt tokens + {request.params.max_new_tokens} new tokens "
                f"were requested"
            )

    @property
    def num_running(self) -> int:
        return len(self._running)

    def free_slots(self) -> int:
        return max(0, self.max_num_seqs - len(self._running))

    def add(self, requests: list[EngineRequest]) -> None:
        for request in requests:
            resumed = self._suspended.pop(request.request_id, None)
            self._running.append(resumed if resumed is not None else self._start(request))
        self._prefill_due = self._prefill_due or bool(requests)

    def step(self) -> list[TokenEvent]:
        """One token for every running sequence; the first step after an `add` also pays the prefill."""
        if self._prefill_due:
            self._prefill_due = False
            self._wait(self.prefill_latency)
        self._wait(self.step_latency + self.per_seq_latency * len(self._running))
        events = [s.step() for s in self._running]
        self._running = [s for s, e in zip(self._running, events, strict=True) if not e.finished]
        return events

    def abort(self, request_ids: Iterable[str]) -> None:
        gone = set(request_ids)
        self._running = [s for s in self._running if s.request.request_id not in gone]
        for request_id in gone:
            self._suspended.pop(request_id, None)

    def suspend(self, request_ids: Iterable[str]) -> None:
        aside = set(request_ids)
        self._suspended.update((s.request.request_id, s) for s in self._running
                               if s.request.request_id in aside)
        self._running = [s for s in self._running if s.request.request_id not in aside]

    def _start(self, request: EngineRequest) -> _Sequence:
        params = request.params
        if params.is_greedy:
            rng = random.Random(_digest(request.prompt))
        elif params.seed is not None:
            rng = random.Random(_digest(f"{params.seed}:{request.prompt}"))
        else:
            rng = random.Random()
        eos_at = None if params.ignore_eos else fake_eos_position(request.prompt)
        return _Sequence(request, rng, StopStringMatcher(params.stop), eos_at)

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self.sleep(seconds)
