"""One request inside the diffusion engine: its canvas (prompt, then gen_length positions that start as the
mask token), which block it is denoising, and how committed blocks become text.

Canvas [P + G] (token ids): positions P.. are generated in blocks of block_length, left to right; inside the
current block a step commits some masked positions, per the plan's schedule. When the block holds no mask
left, its tokens are read like a token-by-token engine's: EOS ends the request (the block's remaining tokens
are dropped), a stop string cuts the text, and the request is billed for the tokens up to that point.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from workers.engines.base import EngineRequest, FinishReason, TokenEvent
from workers.engines.dllm_schedule import DiffusionPlan
from workers.engines.dllm_select import choose, predict
from workers.engines.hf_sequence import Decode, IncrementalDetokenizer
from workers.engines.stopping import StopStringMatcher


@dataclass
class BlockReader:
    """Turns committed blocks into stop-safe text, honouring EOS and stop strings (as SequenceState does)."""

    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    eos_ids: frozenset[int]
    ignore_eos: bool

    def read(self, tokens: list[int], last: bool) -> tuple[str, int, FinishReason | None]:
        """(text, tokens used, finish reason) for one committed block; `last`: no block follows it."""
        text, used = "", 0
        finish: FinishReason | None = None
        for token in tokens:
            used += 1
            if token in self.eos_ids and not self.ignore_eos:
                finish = "stop"
                break
            text += self.matcher.feed(self.detokenizer.push(token))
            if self.matcher.stopped:
                finish = "stop"
                break
        if finish is None and last:
            finish = "length"
        if finish is not None and not self.matcher.stopped:
            text += self.matcher.feed(self.detokenizer.flush())
            if self.matcher.stopped:
                finish = "stop"  # the held-back tail completed a stop string
            else:
                text += self.matcher.flush()
        return text, used, finish


@dataclass
class Canvas:
    """A running diffusion request. `tokens` lives on the engine's device."""

    request: EngineRequest
    plan: DiffusionPlan
    tokens: torch.Tensor  # [P + G]
    mask_id: int
    reader: BlockReader
    generator: torch.Generator | None
    block: int = 0
    step_in_block: int = 0
    counts: list[int] = field(default_factory=list)  # tokens to commit at each step of the current block
    committed_per_step: list[int] = field(default_factory=list)  # a record, for tests and debugging

    @classmethod
    def start(
        cls, request: EngineRequest, plan: DiffusionPlan, mask_id: int, decode: Decode,
        eos_ids: frozenset[int], device: torch.device,
    ) -> Canvas:
        prompt = request.prompt_token_ids
        tokens = torch.tensor(prompt + [mask_id] * plan.gen_length, dtype=torch.long, device=device)
        generator = None
        if plan.temperature > 0 or plan.algorithm == "random":
            generator = torch.Generator(device=device)
            seed = request.params.seed
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        params = request.params
        reader = BlockReader(IncrementalDetokenizer.after_prompt(decode, prompt),
                             StopStringMatcher(params.stop), eos_ids, params.ignore_eos)
        return cls(request, plan, tokens, mask_id, reader, generator, counts=plan.transfer_counts(0))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def block_span(self) -> tuple[int, int]:
        """The current block's [start, end) in canvas positions."""
        start = self.prompt_len + self.block * self.plan.block_length
        return start, start + self.plan.block_length

    def unconditional(self) -> torch.Tensor:
        """The canvas with its prompt masked too: the input of classifier-free guidance's second pass."""
        tokens = self.tokens.clone()
        tokens[: self.prompt_len] = self.mask_id
        return tokens

    def denoise(self, logits: torch.Tensor) -> TokenEvent | None:
        """One step on the current block, from its logits [block_length, V]; its event once complete."""
        start, end = self.block_span
        block = self.tokens[start:end]
        masked = block == self.mask_id
        # the mask token is never an answer: committing it would leave the position masked forever
        logits = logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), float("-inf"))
        predicted, probs = predict(logits, self.plan.temperature, self.generator)
        count = self.counts[self.step_in_block] if self.step_in_block < len(self.counts) else 1
        chosen = choose(self.plan, probs, masked, count, self.generator)
        block[chosen] = predicted[chosen]  # a view: writes into the canvas
        self.committed_per_step.append(int(chosen.numel()))
        self.step_in_block += 1
        if bool((block == self.mask_id).any()):
            return None
        return self._release_block(block.tolist())

    def _release_block(self, tokens: list[int]) -> TokenEvent:
        last = self.block == self.plan.num_blocks - 1
        text, used, finish = self.reader.read(tokens, last)
        self.block += 1
        self.step_in_block = 0
        if finish is None:
            self.counts = self.plan.transfer_counts(self.block)
        return TokenEvent(self.request_id, text, used, finish, tuple(tokens[:used]))
