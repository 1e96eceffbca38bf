"""The masked-diffusion engine in-process: batching never changes a row's tokens, the commit rules follow
their schedules, and each row keeps its own plan, stop rules and seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from workers.engines.base import (
    BadEngineParameter,
    DiffusionParams,
    EngineRequest,
    PromptTooLongError,
    SamplingParams,
)
from workers.engines.dllm import DllmEngine
from workers.engines.dllm_canvas import Canvas
from workers.engines.dllm_schedule import DiffusionDefaults, transfer_counts

LONG = "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
PROMPTS = ["x", "def fibonacci(n):", "import os\nimport sys\n\nclass Handler(object):\n    pass\n", LONG * 4]


@pytest.fixture(scope="module")
def engine(tiny_dllm_dir: Path) -> DllmEngine:
    loaded = DllmEngine(str(tiny_dllm_dir), device="cpu", dtype="float32", trust_remote_code=True,
                        defaults=DiffusionDefaults(gen_length=16, block_length=8))
    loaded.load()
    return loaded


def params(
    gen_length: int = 16, temperature: float = 0.0, seed: int | None = None, stop: tuple[str, ...] = (),
    ignore_eos: bool = True, **diffusion: Any,
) -> SamplingParams:
    return SamplingParams(max_new_tokens=gen_length, temperature=temperature, seed=seed, stop=stop,
                          ignore_eos=ignore_eos, diffusion=DiffusionParams(**diffusion))


@dataclass
class Outcome:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tokens: int = 0
    events: int = 0
    finish_reason: str | None = None
    committed_per_step: list[int] = field(default_factory=list)


def run(engine: DllmEngine, batch: list[EngineRequest],
        joins: dict[int, list[EngineRequest]] | None = None) -> dict[str, Outcome]:
    """Step the engine as the batcher does (joins before given steps); collect each request's outcome."""
    joins = dict(joins or {})
    outcomes: dict[str, Outcome] = {}
    canvases: dict[str, Canvas] = {}
    for request in batch + [r for rs in joins.values() for r in rs]:
        engine.prepare(request)
        outcomes[request.request_id] = Outcome()
    engine.add(batch)
    step = 0
    while engine.num_running or joins:
        step += 1
        if step in joins:
            engine.add(joins.pop(step))
        canvases.update((c.request_id, c) for c in engine._canvases)
        for event in engine.step():
            outcome = outcomes[event.request_id]
            assert outcome.finish_reason is None, "an event after the request's last one"
            outcome.text += event.text
            outcome.token_ids += event.token_ids
            outcome.tokens += event.num_tokens
            outcome.events += 1
            outcome.finish_reason = event.finish_reason
    for request_id, canvas in canvases.items():
        outcomes[request_id].committed_per_step = canvas.committed_per_step
    return outcomes


def alone(engine: DllmEngine, prompt: str, sampling: SamplingParams) -> Outcome:
    return run(engine, [EngineRequest("alone", prompt, sampling)])["alone"]


@pytest.mark.parametrize("algorithm", ["low_confidence", "threshold"])
def test_batched_equals_single_for_very_different_lengths(engine: DllmEngine, algorithm: str) -> None:
    sampling = params(algorithm=algorithm, threshold=0.03)
    singles = [alone(engine, p, sampling).token_ids for p in PROMPTS]
    outcomes = run(engine, [EngineRequest(f"r{i}", p, sampling) for i, p in enumerate(PROMPTS)])
    assert [outcomes[f"r{i}"].token_ids for i in range(len(PROMPTS))] == singles
    assert len({tuple(t) for t in singles}) == len(singles)  # discriminative: each prompt answers differently
    assert all(len(t) == 16 for t in singles)


def test_requests_with_other_plans_join_a_running_batch_unchanged(engine: DllmEngine) -> None:
    plans = [params(16, block_length=8), params(8, steps=4), params(24, block_length=4, algorithm="threshold",
                                                                    threshold=0.03)]
    singles = [alone(engine, p, s).token_ids for p, s in zip(PROMPTS, plans, strict=False)]
    outcomes = run(engine, [EngineRequest("r0", PROMPTS[0], plans[0])], joins={
        3: [EngineRequest("r1", PROMPTS[1], plans[1])], 5: [EngineRequest("r2", PROMPTS[2], plans[2])]})
    assert [outcomes[f"r{i}"].token_ids for i in range(3)] == singles


def test_blocks_stream_as_they_are_committed(engine: DllmEngine) -> None:
    outcome = alone(engine, PROMPTS[1], params(16, block_length=4))
    assert outcome.events == 4 and outcome.tokens == 16 and outcome.finish_reason == "length"


@pytest.mark.parametrize(("gen_length", "block_length", "steps"), [(16, 8, 16), (16, 8, 6), (12, 4, 5)])
def test_low_confidence_commits_per_the_linear_schedule(
    engine: DllmEngine, gen_length: int, block_length: int, steps: int,
) -> None:
    outcome = alone(engine, PROMPTS[1], params(gen_length, block_length=block_length, steps=steps))
    blocks = gen_length // block_length
    per_block = [steps // blocks + (1 if b < steps % blocks else 0) for b in range(blocks)]
    expected = [n for b in range(blocks) for n in transfer_counts(block_length, per_block[b])]
    assert outcome.committed_per_step == expected
    assert sum(expected) == gen_length and len(expected) == steps


def test_transfer_counts_spread_the_rest_over_the_first_steps() -> None:
    assert transfer_counts(8, 3) == [3, 3, 2]
    assert transfer_counts(32, 32) == [1] * 32


def test_threshold_commits_several_when_confident_and_never_zero(engine: DllmEngine) -> None:
    confident = alone(engine, PROMPTS[1], params(16, algorithm="threshold", threshold=0.02))
    assert max(confident.committed_per_step) > 1
    assert len(confident.committed_per_step) < 16  # fewer steps than tokens
    never = alone(engine, PROMPTS[1], params(16, algorithm="threshold", threshold=1.0))
    assert never.committed_per_step == [1] * 16  # nothing clears the bar: still one per step
    assert len(confident.token_ids) == len(never.token_ids) == 16


def test_random_remasking_differs_from_low_confidence_with_the_same_seed(engine: DllmEngine) -> None:
    low = alone(engine, PROMPTS[1], params(16, seed=3))
    rand = alone(engine, PROMPTS[1], params(16, seed=3, algorithm="random"))
    again = alone(engine, PROMPTS[1], params(16, seed=3, algorithm="random"))
    assert rand.token_ids != low.token_ids
    assert rand.token_ids == again.token_ids  # the seed makes it reproducible


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: DllmEngine) -> None:
    sampled = params(16, temperature=1.0, seed=7)
    first = alone(engine, PROMPTS[1], sampled).token_ids
    outcomes = run(engine, [EngineRequest("other", PROMPTS[3], params(16)),
                            EngineRequest("seeded", PROMPTS[1], sampled)])
    assert outcomes["seeded"].token_ids == first
    assert alone(engine, PROMPTS[1], params(16, temperature=1.0, seed=8)).token_ids != first
    assert first != alone(engine, PROMPTS[1], params(16)).token_ids


def test_classifier_free_guidance_changes_the_answer_and_batches_unchanged(engine: DllmEngine) -> None:
    guided = params(16, cfg_scale=1.5)
    single = alone(engine, PROMPTS[2], guided).token_ids
    assert single != alone(engine, PROMPTS[2], params(16)).token_ids
    outcomes = run(engine, [EngineRequest("plain", PROMPTS[0], params(16)),
                            EngineRequest("guided", PROMPTS[2], guided)])
    assert outcomes["guided"].token_ids == single


def test_eos_ends_the_request_at_its_block_and_trims_the_answer(engine: DllmEngine) -> None:
    reference = alone(engine, PROMPTS[1], params(16, block_length=4))
    eos = reference.token_ids[5]  # pretend the 6th token (second block) is EOS
    first = reference.token_ids.index(eos)
    saved = engine._eos_ids
    engine._eos_ids = frozenset({eos})
    try:
        outcome = alone(engine, PROMPTS[1], params(16, block_length=4, ignore_eos=False))
    finally:
        engine._eos_ids = saved
    assert outcome.finish_reason == "stop"
    assert outcome.token_ids == reference.token_ids[: first + 1]  # billed up to and including EOS
    assert outcome.tokens == first + 1
    assert len(outcome.committed_per_step) == 4 * (first // 4 + 1)  # no block after the EOS block ran
    assert reference.text.startswith(outcome.text)


def test_stop_string_cuts_the_text_and_finishes_with_stop(engine: DllmEngine) -> None:
    reference = alone(engine, PROMPTS[1], params(16)).text
    stop = reference[6:9]
    outcome = alone(engine, PROMPTS[1], params(16, stop=(stop,)))
    assert outcome.finish_reason == "stop"
    assert outcome.text == reference[: reference.index(stop)]
    assert outcome.tokens < 16


@pytest.mark.parametrize(("sampling", "field_name"), [
    (params(16, block_length=5), "block_length"),
    (params(16, block_length=4, steps=3), "steps"),
    (params(16, steps=17), "steps"),
    (params(16, algorithm="sideways"), "algorithm"),
    (SamplingParams(max_new_tokens=16, top_p=0.5), "top_p"),
    (SamplingParams(max_new_tokens=4000, diffusion=DiffusionParams(gen_length=4000)), "gen_length"),
])
def test_bad_settings_are_refused_naming_the_field(
    engine: DllmEngine, sampling: SamplingParams, field_name: str,
) -> None:
    with pytest.raises(BadEngineParameter) as caught:
        engine.prepare(EngineRequest("bad", "hello", sampling))
    assert caught.value.field == field_name


def test_a_length_beyond_the_context_from_max_tokens_is_a_context_error(engine: DllmEngine) -> None:
    with pytest.raises(PromptTooLongError):
        engine.prepare(EngineRequest("long", "hello", params(engine.max_model_len)))


def test_default_block_length_is_the_largest_divisor_of_the_length(engine: DllmEngine) -> None:
    outcome = alone(engine, PROMPTS[1], params(12))  # default block_length 8 does not divide 12: blocks of 6
    assert outcome.events == 2 and outcome.tokens == 12


def test_suspended_canvases_resume_where_they_stopped(engine: DllmEngine) -> None:
    requests = [EngineRequest(f"r{i}", p, params(16, block_length=4)) for i, p in enumerate(PROMPTS[:3])]
    singles = [alone(engine, r.prompt, r.params).token_ids for r in requests]
    for request in requests:
        engine.prepare(request)
    engine.add(requests)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for step in range(1, 200):
        if step == 3:
            engine.suspend(["r1", "r2"])  # an out-of-memory split: two rows wait with what they committed
        if step == 9:
            engine.add(requests[1:])
        for event in engine.step():
            tokens[event.request_id] += event.token_ids
        if not engine.num_running and step > 9:
            break
    assert [tokens[r.request_id] for r in requests] == singles


def test_the_worker_flag_offers_exactly_the_engine_algorithms() -> None:
    from workers.config import DLLM_ALGORITHMS
    from workers.engines.base import DIFFUSION_ALGORITHMS

    assert DLLM_ALGORITHMS == DIFFUSION_ALGORITHMS  # config.py cannot import the engines package (a cycle)


def test_model_code_runs_only_with_trust_remote_code(tiny_dllm_dir: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        DllmEngine(str(tiny_dllm_dir), device="cpu", dtype="float32").load()
