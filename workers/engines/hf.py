"""The transformers engine: left-padded batches decoded step by step with a KV cache, continuously batched.

Requests the batcher adds are prefilled as their own left-padded batch at the next step and merged into the
running one; finished or aborted rows leave it at once. Each row keeps its own sampling parameters, stop
rules and detokeniser, so a row's tokens do not depend on which other rows share its batch (fp32: exactly).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.engines.base import EngineInfo, EngineRequest, PromptTooLongError, TokenEvent
from workers.engines.hf_batch import DecodeBatch, cache_is_mergeable
from workers.engines.hf_loading import LoadSpec, load_model
from workers.engines.hf_sampling import RowSampler, choose_tokens
from workers.engines.hf_sequence import IncrementalDetokenizer, SequenceState

DEFAULT_MAX_NUM_SEQS = 256  # rows decoded together at most; the batcher's own limit usually binds first
# how config.json files spell the context length
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def torch_threads() -> int:
    """Intra-op threads for CPU inference: IB_TORCH_THREADS if set, else 1.

    One thread measured best on the shared 2-core machines: with two, every small op pays for thread
    hand-offs and any other busy process stalls the pair (bench/RESULTS.md, worker throughput).
    """
    raw = os.environ.get("IB_TORCH_THREADS", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"IB_TORCH_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def context_length_from_config(model_path: str) -> int | None:
    """The model's context length read from config.json, without importing transformers."""
    try:
        config = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)  # multimodal configs nest the language model's settings
    return next((int(config[k]) for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)


class HFEngine:
    """Engine protocol implementation over `AutoModelForCausalLM` (see workers/engines/base.py)."""

    def __init__(
        self,
        model_path: str,
        *,
        served_model_name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        load_spec: LoadSpec | None = None,
    ) -> None:
        self.model_path = model_path
        self.load_spec = load_spec or LoadSpec(model_path)  # where the weights come from and how
        self.served_model_name = served_model_name or model_path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_num_seqs = max_num_seqs
        context = context_length_from_config(str(self.load_spec.architecture_dir))
        self.max_model_len = max_model_len or context or 2048
        self.model: Any = None
        self.tokenizer: Any = None
        self._decode: Callable[[Sequence[int]], str] = lambda ids: ""
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._start_id = 0  # fed in place of an empty prompt
        self._vocab_size = 0  # rows of the output layer (may exceed the tokenizer's vocabulary)
        self._mergeable = True  # False for sliding-window caches: no joins, no trimming of padding
        self._joining: list[SequenceState] = []  # added since the last step; prefilled by the next one
        self._batch: DecodeBatch | None = None  # the rows being decoded
        self._suspended: dict[str, SequenceState] = {}  # set aside by `suspend`, resumed by `add`
        self._undelivered: list[TokenEvent] = []  # made by a step that then failed; the next one returns them

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("hf", self.served_model_name, str(self.device), self.max_model_len)

    def load(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads())
        self.model, self.tokenizer = load_model(self.load_spec, self.device, self.dtype)
        tok, gen = self.tokenizer, self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad_candidates = (tok.pad_token_id, gen.pad_token_id, tok.eos_token_id, 0)
        self._pad_id = next(i for i in pad_candidates if i is not None)
        self._start_id = next(i for i in (tok.bos_token_id, tok.eos_token_id, self._pad_id) if i is not None)
        self._vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self._mergeable = cache_is_mergeable(self.model)
        backend = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer: ~10x less overhead per call
        if backend is not None:
            self._decode = lambda ids: str(backend.decode(list(ids), skip_special_tokens=True))
        else:
            self._decode = lambda ids: str(tok.decode(list(ids), skip_special_tokens=True))
        self._warm_up()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            tok = self.tokenizer
            return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # no template: a plain transcript the model can continue
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def prepare(self, request: EngineRequest) -> None:
        tok = self.tokenizer
        # a prompt that already starts with BOS (chat templates add it) must not get a second one
        has_bos = bool(tok.bos_token) and request.prompt.startswith(tok.bos_token)
        ids = tok.encode(request.prompt, add_special_tokens=not has_bos) if request.prompt else []
        ids = ids or [self._start_id]
        total = len(ids) + request.params.max_new_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {total} were "
                f"requested ({len(ids)} in the prompt, {request.params.max_new_tokens} to generate)"
            )
        request.prompt_token_ids = ids

    @property
    def num_running(self) -> int:
        return len(self._joining) + (len(self._batch) if self._batch is not None else 0)

    def free_slots(self) -> int:
        if not self._mergeable and self.num_running:
            return 0  # a sliding-window cache cannot take new rows: they wait until the running ones are done
        return max(0, self.max_num_seqs - self.num_running)

    def add(self, requests: list[EngineRequest]) -> None:
        for request in requests:
            resumed = self._suspended.pop(request.request_id, None)
            self._joining.append(resumed if resumed is not None else self._new_sequence(request))

    def step(self) -> list[TokenEvent]:
        """One token for every request: joiners get theirs from their prefill, running rows from a decode
        step; then the joiners merge into the running batch (left-padded to a common length)."""
        events, self._undelivered = self._undelivered, []
        joining, self._joining = self._joining, []
        joined: DecodeBatch | None = None
        try:
            if joining:
                joined = self._prefill(joining, events)
            if self._batch is not None and len(self._batch):
                self._decode_step(self._batch, events)
        except BaseException:
            self._start_over(joining, events)
            raise
        if joined is not None:
            if self._batch is None or not len(self._batch):
                self._batch = joined
            else:
                self._batch.merge(joined)
        return events

    def _start_over(self, joining: list[SequenceState], events: list[TokenEvent]) -> None:
        """After a failed step (out of memory, typically) the KV cache may hold half a step: drop it. Every
        unfinished sequence keeps its tokens and is prefilled again (prompt + generated) by the next step,
        which also hands out the events this one made before it failed."""
        running = self._batch.seqs if self._batch is not None else []
        self._joining = [s for s in joining + running if s.finish_reason is None]
        self._batch = None
        self._undelivered = events
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def abort(self, request_ids: Iterable[str]) -> None:
        gone = set(request_ids)
        self._remove(gone)
        for request_id in gone:
            self._suspended.pop(request_id, None)

    def suspend(self, request_ids: Iterable[str]) -> None:
        """Set rows aside with their tokens; `add` resumes them by prefilling prompt + generated tokens."""
        self._suspended.update((s.request_id, s) for s in self._remove(set(request_ids)))

    def _remove(self, ids: set[str]) -> list[SequenceState]:
        """Take these sequences out of the joining and running rows; return them."""
        removed = [s for s in self._joining if s.request_id in ids]
        self._joining = [s for s in self._joining if s.request_id not in ids]
        if self._batch is not None:
            removed += [s for s in self._batch.seqs if s.request_id in ids]
            self._batch.keep([i for i, s in enumerate(self._batch.seqs) if s.request_id not in ids],
                             trim=self._mergeable)
        return removed

    @torch.inference_mode()
    def _prefill(self, seqs: list[SequenceState], events: list[TokenEvent]) -> DecodeBatch | None:
        """Prefill sequences (new ones, or resumed ones from their tokens); new ones get their first token.

        A resumed sequence's cache is rebuilt from its prompt and all but its newest token, which stays the
        next decode step's input, so it continues as if it had never left.
        """
        batch, logits = DecodeBatch.prefill(self.model, seqs, self._pad_id)
        fresh = [i for i, s in enumerate(seqs) if not s.generated]
        tokens = [s.generated[-1] if s.generated else self._pad_id for s in seqs]
        if fresh:
            chosen = choose_tokens(logits[fresh] if len(fresh) < len(seqs) else logits,
                                   [seqs[i].sampler for i in fresh])
            for i, token in zip(fresh, chosen, strict=True):
                tokens[i] = token
        self._advance(batch, tokens, fresh, events)
        return batch if len(batch) else None

    @torch.inference_mode()
    def _decode_step(self, batch: DecodeBatch, events: list[TokenEvent]) -> None:
        logits = batch.decode(self.model)
        tokens = choose_tokens(logits, [s.sampler for s in batch.seqs])
        self._advance(batch, tokens, range(len(batch)), events)

    def _advance(
        self, batch: DecodeBatch, tokens: list[int], new: Sequence[int] | range, events: list[TokenEvent],
    ) -> None:
        """Record the rows' next tokens [B] (those at indices `new` are freshly generated: one event each,
        appended to `events` as made) and drop rows that finished."""
        finished = set()
        for i in new:
            event = batch.seqs[i].append(tokens[i])
            events.append(event)
            if event.finished:
                finished.add(i)
        batch.set_next_tokens(tokens)
        batch.keep([i for i in range(len(batch)) if i not in finished], trim=self._mergeable)

    def _new_sequence(self, request: EngineRequest) -> SequenceState:
        if not request.prompt_token_ids:
            self.prepare(request)
        return SequenceState(
            request=request,
            sampler=RowSampler(request.params, request.prompt_token_ids, self._vocab_size, self.device),
            detokenizer=IncrementalDetokenizer.after_prompt(self._decode, request.prompt_token_ids),
            eos_ids=self._eos_ids,
            max_total_tokens=self.max_model_len,
        )

    def _warm_up(self) -> None:
        """One tiny prefill and decode step, so the first request does not pay for lazy initialisation."""
        from workers.engines.base import SamplingParams, run_to_completion

        request = EngineRequest("warm-up", "", SamplingParams(max_new_tokens=2, ignore_eos=True))
        for _ in run_to_completion(self, [request]):
            pass
