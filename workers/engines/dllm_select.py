"""One diffusion step for one row's current block: predict every masked position, then pick which to commit.

Prediction: the arg-max token, after Gumbel noise scaled by the temperature when sampling (Gumbel-max draws
from softmax(logits / temperature); float64, as low-precision Gumbel noise is known to hurt masked diffusion).
Commit rules (`algorithm`): low_confidence commits the `count` most probable predictions; random commits
`count` positions drawn uniformly; threshold commits every prediction whose probability exceeds the
threshold, and at least the single most probable one, so a step never commits nothing.
"""

from __future__ import annotations

import torch

from workers.engines.dllm_schedule import DiffusionPlan


def predict(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [L] and their probabilities [L] (under the un-noised logits) for logits [L, V]."""
    logits = logits.double()
    if temperature > 0:
        assert generator is not None, "sampling needs the row's generator"
        uniform = torch.rand(logits.shape, generator=generator, device=generator.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.to(logits.device)))
        tokens = torch.argmax(logits / temperature + gumbel, dim=-1)
    else:
        tokens = torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, probs


def choose(
    plan: DiffusionPlan, probs: torch.Tensor, masked: torch.Tensor, count: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Indices (into the block) to commit this step; only masked positions, at least one while any is left.

    probs [L]: the predictions' probabilities; masked [L] bool; count: the schedule's number for this step.
    """
    remaining = int(masked.sum())
    if remaining == 0:
        return torch.zeros(0, dtype=torch.long, device=probs.device)
    if plan.algorithm == "random":
        assert generator is not None, "random remasking needs the row's generator"
        uniform = torch.rand(probs.shape, generator=generator, device=generator.device)
        score = uniform.to(probs.device).double()
    else:
        score = probs
    if plan.algorithm == "threshold":
        count = int((masked & (probs > plan.threshold)).sum())
    count = min(max(count, 1), remaining)
    score = torch.where(masked, score, torch.tensor(float("-inf"), dtype=score.dtype, device=score.device))
    return torch.topk(score, count).indices
