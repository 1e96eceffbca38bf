"""The fake engine's rules: deterministic text, stop strings, max tokens, EOS, GPU-like latency model."""

from __future__ import annotations

from workers.engines.base import EngineRequest, SamplingParams, TokenEvent, run_to_completion
from workers.engines.fake import FakeEngine, fake_eos_position


def run(engine: FakeEngine, *requests: EngineRequest) -> dict[str, list[TokenEvent]]:
    out: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.prepare(r)
    for events in run_to_completion(engine, list(requests)):
        for event in events:
            out[event.request_id].append(event)
    return out


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def req(rid: str, prompt: str = "a prompt", **params: object) -> EngineRequest:
    base: dict[str, object] = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    return EngineRequest(rid, prompt, SamplingParams(**{**base, **params}))  # type: ignore[arg-type]


def test_greedy_text_depends_only_on_the_prompt() -> None:
    alone = run(FakeEngine(), req("a"))["a"]
    batched = run(FakeEngine(), req("a"), req("b", "another prompt", max_new_tokens=3))["a"]
    assert text(alone) == text(batched)
    assert len(alone) == 8 and alone[-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_differs_by_seed() -> None:
    one = text(run(FakeEngine(), req("a", temperature=1.0, seed=1))["a"])
    again = text(run(FakeEngine(), req("a", temperature=1.0, seed=1))["a"])
    other = text(run(FakeEngine(), req("a", temperature=1.0, seed=2))["a"])
    assert one == again != other


def test_stop_string_ends_the_request_without_the_stop_text() -> None:
    full = text(run(FakeEngine(), req("a"))["a"])
    stop = full.split(" ")[3]
    events = run(FakeEngine(), req("a", stop=(stop,)))["a"]
    assert events[-1].finish_reason == "stop"
    assert text(events) == full[: full.index(" " + stop) + 1]


def test_eos_comes_at_its_position_unless_ignored() -> None:
    prompt = next(p for p in (f"p{i}" for i in range(500)) if fake_eos_position(p))
    position = fake_eos_position(prompt)
    events = run(FakeEngine(), req("a", prompt, max_new_tokens=100, ignore_eos=False))["a"]
    assert sum(e.num_tokens for e in events) == position
    assert events[-1].finish_reason == "stop"


def test_step_time_grows_with_running_sequences() -> None:
    slept: list[float] = []
    engine = FakeEngine(prefill_latency=0.5, step_latency=0.1, per_seq_latency=0.01, sleep=slept.append)
    run(engine, req("a", max_new_tokens=2), req("b", max_new_tokens=1))
    # prefill once, then a step with two sequences, then a step with the one left
    assert slept == [0.5, 0.1 + 0.02, 0.1 + 0.01]
