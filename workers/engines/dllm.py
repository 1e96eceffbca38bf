"""The masked-diffusion engine (LLaDA-style): canvases of prompt + gen_length mask tokens, denoised in blocks.

Every step runs the model once over all running canvases, left-padded into one batch [B, S] with an attention
mask that hides the padding from every query and positions taken from the mask, so a row's logits do not
depend on its neighbours; then each row commits some predictions in its current block (dllm_select.py) and a
completed block is streamed as one event. Rows carry their own plan (gen_length, block_length, steps,
algorithm, ...), so requests with different settings share a batch: the forward pass is over whole canvases
and nothing is shared between rows but the padding. There is no KV cache, so requests join any step.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.engines.base import (
    BadEngineParameter,
    EngineInfo,
    EngineRequest,
    PromptTooLongError,
    TokenEvent,
)
from workers.engines.dllm_canvas import Canvas
from workers.engines.dllm_schedule import DiffusionDefaults, plan_for
from workers.engines.hf import context_length_from_config, resolve_device, resolve_dtype, torch_threads

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_SEQS = 256


class DllmEngine:
    """Engine protocol implementation over a bidirectional mask predictor (see workers/engines/base.py)."""

    def __init__(
        self,
        model_path: str,
        *,
        served_model_name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        defaults: DiffusionDefaults | None = None,
        mask_token_id: int | None = None,
        trust_remote_code: bool = False,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    ) -> None:
        self.model_path = model_path
        self.served_model_name = served_model_name or model_path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_model_len = max_model_len or context_length_from_config(model_path) or 2048
        self.defaults = defaults or DiffusionDefaults()
        self.mask_token_id = mask_token_id
        self.trust_remote_code = trust_remote_code
        self.max_num_seqs = max_num_seqs
        self.model: Any = None
        self.tokenizer: Any = None
        self._decode: Callable[[Sequence[int]], str] = lambda ids: ""
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._start_id = 0
        self._takes_positions = False  # whether the model's forward accepts position_ids (LLaDA's does not)
        self._canvases: list[Canvas] = []
        self._suspended: dict[str, Canvas] = {}  # set aside by `suspend`, resumed by `add`
        self._undelivered: list[TokenEvent] = []  # made by a step that then failed; the next one returns them

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("dllm", self.served_model_name, str(self.device), self.max_model_len,
                          default_max_tokens=self.defaults.gen_length)

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = os.path.expanduser(self.model_path)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model path {self.model_path!r} is not a directory")
        custom = json.loads((Path(path) / "config.json").read_text()).get("auto_map")
        if custom and not self.trust_remote_code:  # transformers would ask on stdin, which a worker has not
            raise ValueError(f"trust_remote_code: {self.model_path} ships its own model code (auto_map in "
                             "config.json), as LLaDA checkpoints do; pass --trust-remote-code to run it")
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads())
        remote = self.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        model = AutoModel.from_pretrained(path, dtype=self.dtype, trust_remote_code=remote)
        self.model = model.to(self.device).eval()
        tok, config = self.tokenizer, self.model.config
        mask_id = next((i for i in (self.mask_token_id, getattr(config, "mask_token_id", None),
                                    tok.mask_token_id) if i is not None), None)
        if mask_id is None:
            raise ValueError(f"mask_token_id: {self.model_path} names no mask token (config.json "
                             "mask_token_id or the tokenizer's mask_token); pass --mask-token-id")
        self.mask_token_id = int(mask_id)
        eos = {i for i in (tok.eos_token_id, getattr(config, "eos_token_id", None)) if isinstance(i, int)}
        self._eos_ids = frozenset(eos)
        self._pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self._start_id = next(i for i in (tok.bos_token_id, tok.eos_token_id, self._pad_id) if i is not None)
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: str(backend.decode(list(ids), skip_special_tokens=True))
        else:
            self._decode = lambda ids: str(tok.decode(list(ids), skip_special_tokens=True))
        log.info("dllm engine: mask token %d, eos %s, defaults %s", self.mask_token_id, sorted(eos),
                 self.defaults)
        self._warm_up()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            tok = self.tokenizer
            return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def prepare(self, request: EngineRequest) -> None:
        plan = plan_for(request.params, self.defaults)  # BadEngineParameter names a bad field
        tok = self.tokenizer
        has_bos = bool(tok.bos_token) and request.prompt.startswith(tok.bos_token)
        ids = tok.encode(request.prompt, add_special_tokens=not has_bos) if request.prompt else []
        ids = ids or [self._start_id]
        total = len(ids) + plan.gen_length
        if total > self.max_model_len:
            message = (f"this model's maximum context length is {self.max_model_len} tokens, but {total} "
                       f"were requested ({len(ids)} in the prompt, {plan.gen_length} to generate)")
            if request.params.diffusion.gen_length is not None:
                raise BadEngineParameter("gen_length", message)
            raise PromptTooLongError(message)
        request.prompt_token_ids = ids

    # ---- the step seam ---------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._canvases)

    def free_slots(self) -> int:
        return max(0, self.max_num_seqs - len(self._canvases))

    def add(self, requests: list[EngineRequest]) -> None:
        for request in requests:
            if request.request_id in self._suspended:
                self._canvases.append(self._suspended.pop(request.request_id))
                continue
            if not request.prompt_token_ids:
                self.prepare(request)
            plan = plan_for(request.params, self.defaults)
            self._canvases.append(Canvas.start(request, plan, self.mask_token_id or 0, self._decode,
                                               self._eos_ids, self.device))

    def abort(self, request_ids: Iterable[str]) -> None:
        gone = set(request_ids)
        self._canvases = [c for c in self._canvases if c.request_id not in gone]
        for request_id in gone:
            self._suspended.pop(request_id, None)

    def suspend(self, request_ids: Iterable[str]) -> None:
        """Set canvases aside as they are (no cache to rebuild): `add` puts them back."""
        aside = set(request_ids)
        self._suspended.update((c.request_id, c) for c in self._canvases if c.request_id in aside)
        self._canvases = [c for c in self._canvases if c.request_id not in aside]

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One denoising step for every canvas; events for the blocks it completed."""
        events, self._undelivered = self._undelivered, []
        try:
            self._denoise_all(events)
        except BaseException:  # out of memory, typically: the events made so far come out of the next step
            self._undelivered = events
            raise
        finally:
            finished = {e.request_id for e in events if e.finished}
            self._canvases = [c for c in self._canvases if c.request_id not in finished]
        return events

    def _denoise_all(self, events: list[TokenEvent]) -> None:
        canvases = self._canvases
        if not canvases:
            return
        guided = [c for c in canvases if c.plan.cfg_scale > 0]
        unconditional_row = {id(c): len(canvases) + k for k, c in enumerate(guided)}
        rows = [c.tokens for c in canvases] + [c.unconditional() for c in guided]
        logits, offsets = self._forward(rows)  # logits [R, S, V]; offsets: each row's left padding
        for i, canvas in enumerate(canvases):
            start, end = canvas.block_span
            block_logits = logits[i, offsets[i] + start : offsets[i] + end]
            if canvas.plan.cfg_scale > 0:
                j = unconditional_row[id(canvas)]
                plain = logits[j, offsets[j] + start : offsets[j] + end]
                block_logits = plain + (canvas.plan.cfg_scale + 1) * (block_logits - plain)
            event = canvas.denoise(block_logits)
            if event is not None:
                events.append(event)

    def _forward(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """The model over rows (canvases of different lengths) left-padded into one batch [R, S]."""
        width = max(int(r.shape[0]) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)  # 1 = real, 0 = padding
        offsets = []
        for i, row in enumerate(rows):
            offset = width - int(row.shape[0])
            input_ids[i, offset:] = row
            mask[i, offset:] = 1
            offsets.append(offset)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if self._takes_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # [R, S]: padding never shifts a row
        logits: torch.Tensor = self.model(**kwargs).logits
        return logits, offsets

    def _warm_up(self) -> None:
        """One tiny request, so the first real one does not pay for lazy initialisation."""
        from workers.engines.base import SamplingParams, run_to_completion

        request = EngineRequest("warm-up", "", SamplingParams(max_new_tokens=2, temperature=0.0,
                                                              ignore_eos=True))
        self.prepare(request)
        for _ in run_to_completion(self, [request]):
            pass
