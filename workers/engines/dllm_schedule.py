"""A diffusion request's plan: its generated length cut into blocks, the denoising steps shared over them,
and how many tokens each step commits (the reference linear schedule). Pure Python: validated off the engine
thread, before the request queues, so a bad setting is a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engines.base import DIFFUSION_ALGORITHMS, BadEngineParameter, SamplingParams

UNSUPPORTED_SAMPLING = ("top_p", "top_k", "repetition_penalty")  # token-by-token filters: refused


@dataclass(frozen=True)
class DiffusionDefaults:
    """The worker's settings (`--dllm-*` flags); a request may override each (extra body fields)."""

    gen_length: int = 64  # generated when a request names no max_tokens
    block_length: int = 32
    steps: int | None = None  # None: as many as gen_length (one token per step)
    algorithm: str = "low_confidence"
    threshold: float = 0.9
    cfg_scale: float = 0.0


@dataclass(frozen=True)
class DiffusionPlan:
    """How one request is generated. `steps` are shared over the blocks, earlier blocks taking the rest."""

    gen_length: int
    block_length: int
    steps: int
    algorithm: str
    threshold: float
    cfg_scale: float
    temperature: float

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def steps_in_block(self, block: int) -> int:
        base, rest = divmod(self.steps, self.num_blocks)
        return base + (1 if block < rest else 0)

    def transfer_counts(self, block: int) -> list[int]:
        """Tokens each step of `block` commits (low_confidence, random); they add up to block_length."""
        return transfer_counts(self.block_length, self.steps_in_block(block))


def transfer_counts(masked: int, steps: int) -> list[int]:
    """The linear schedule: `masked` tokens spread evenly over `steps`, the first steps taking the rest.

    A linear noise schedule expects the same number of tokens to turn from mask to text at every step.
    """
    base, rest = divmod(masked, steps)
    return [base + (1 if i < rest else 0) for i in range(steps)]


def plan_for(params: SamplingParams, defaults: DiffusionDefaults) -> DiffusionPlan:
    """Resolve a request's plan from its parameters and the defaults; BadEngineParameter names a bad field."""
    for name in UNSUPPORTED_SAMPLING:
        if getattr(params, name) != getattr(SamplingParams, name):
            raise BadEngineParameter(name, f"{name} is not supported by the dllm engine (a diffusion step "
                                     "predicts every position at once); leave it unset")
    asked = params.diffusion
    gen_length = params.max_new_tokens
    length_field = "gen_length" if asked.gen_length is not None else "max_tokens"
    if asked.block_length is not None:
        block_length = asked.block_length
        if gen_length % block_length:
            raise BadEngineParameter("block_length", f"block_length={block_length} must divide "
                                     f"{length_field}={gen_length}")
    else:  # the largest divisor of gen_length not above the default keeps the blocks semi-autoregressive
        largest = min(defaults.block_length, gen_length)
        block_length = next(b for b in range(largest, 0, -1) if not gen_length % b)
    num_blocks = gen_length // block_length
    if asked.steps is None:  # the worker's default, fitted to this request's length and blocks
        steps = min(max(defaults.steps or gen_length, num_blocks), gen_length)
    else:
        steps = asked.steps
        if steps < num_blocks:
            raise BadEngineParameter("steps", f"steps={steps} is fewer than the {num_blocks} blocks of "
                                     f"{length_field}={gen_length} / block_length={block_length}; each "
                                     "block needs at least one step")
        if steps > gen_length:
            raise BadEngineParameter("steps", f"steps={steps} exceeds {length_field}={gen_length}: a step "
                                     "commits at least one token")
    algorithm = asked.algorithm or defaults.algorithm
    if algorithm not in DIFFUSION_ALGORITHMS:
        raise BadEngineParameter("algorithm", f"algorithm must be one of {', '.join(DIFFUSION_ALGORITHMS)}, "
                                 f"got {algorithm!r}")
    return DiffusionPlan(
        gen_length=gen_length, block_length=block_length, steps=steps, algorithm=algorithm,
        threshold=asked.threshold if asked.threshold is not None else defaults.threshold,
        cfg_scale=asked.cfg_scale if asked.cfg_scale is not None else defaults.cfg_scale,
        temperature=params.temperature,
    )
