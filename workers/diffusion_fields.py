"""The dllm engine's extra request fields, read from a request body with the same typed checks as the rest.

`gen_length` (tokens to generate; replaces max_tokens), `block_length`, `steps`, `algorithm`
(low_confidence | random | threshold), `threshold` (0-1) and `cfg_scale` (>= 0). With the OpenAI SDK they go
in `extra_body`. Accepted only when the worker runs the dllm engine; elsewhere they are unknown fields (400).
How they fit together (block_length divides gen_length, enough steps for the blocks) is checked by the
engine's planner before the request queues, also as a 400 naming the field.
"""

from __future__ import annotations

from workers.engines.base import DIFFUSION_ALGORITHMS, DiffusionParams
from workers.errors import InvalidRequest
from workers.fields import Fields

DIFFUSION_KEYS = frozenset({"gen_length", "block_length", "steps", "algorithm", "threshold", "cfg_scale"})


def parse_diffusion(fields: Fields) -> DiffusionParams:
    algorithm = fields.string("algorithm", None)
    if algorithm is not None and algorithm not in DIFFUSION_ALGORITHMS:
        raise InvalidRequest(f"algorithm must be one of {', '.join(DIFFUSION_ALGORITHMS)}, got {algorithm!r}",
                             param="algorithm")
    return DiffusionParams(
        gen_length=fields.integer("gen_length", None, minimum=1),
        block_length=fields.integer("block_length", None, minimum=1),
        steps=fields.integer("steps", None, minimum=1),
        algorithm=algorithm,
        threshold=fields.number("threshold", None, minimum=0.0, maximum=1.0),  # type: ignore[arg-type]
        cfg_scale=fields.number("cfg_scale", None, minimum=0.0),  # type: ignore[arg-type]
    )
