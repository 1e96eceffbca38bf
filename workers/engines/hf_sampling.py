"""Per-row next-token choice for a decode batch: greedy rows share one argmax, sampled rows own a generator.

Logits follow transformers' `generate`, in order: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import secrets

import torch

from workers.engines.base import SamplingParams


class RowSampler:
    """One request's sampling state: its parameters, its seeded generator and the tokens it has seen."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device,
    ) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        # seen: [V] bool, only kept when a repetition penalty needs it (prompt and generated tokens count)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device)] = True

    @property
    def needs_processing(self) -> bool:
        """False for plain greedy rows, whose token is the batch argmax."""
        return self.generator is not None or self.seen is not None

    def observe(self, token_id: int) -> None:
        if self.seen is not None and token_id < self.seen.numel():
            self.seen[token_id] = True

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from this row's logits [V] (float)."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen[: logits.numel()], penalised, logits)
        if self.generator is None:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # drop a token when the tokens ranked above it already reach top_p; the best token always stays
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            drop_sorted[0] = False
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # back to vocabulary order
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token per row for logits [B, V]: one batched argmax, then per-row processing where needed."""
    tokens: list[int] = torch.argmax(logits, dim=-1).tolist()
    for row, sampler in enumerate(samplers):
        if sampler.needs_processing:
            tokens[row] = sampler.choose(logits[row])
    return tokens
