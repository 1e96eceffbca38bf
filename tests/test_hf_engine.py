"""The transformers engine in-process: batching never changes a row's tokens, and each row keeps its rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from workers.engines.base import EngineRequest, PromptTooLongError, SamplingParams
from workers.engines.hf import HFEngine

LONG = "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
PROMPTS = ["x", "def fibonacci(n):", "import os\nimport sys\n\nclass Handler(object):\n    pass\n", LONG * 6]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFEngine:
    loaded = HFEngine(str(tiny_model_dir), device="cpu", dtype="float32")
    loaded.load()
    return loaded


@pytest.fixture
def batch_sizes(engine: HFEngine) -> Iterator[list[int]]:
    """The batch dimension of every forward pass the model runs during the test."""
    sizes: list[int] = []

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        sizes.append(int(kwargs["input_ids"].shape[0]))

    handle = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    yield sizes
    handle.remove()


@dataclass
class Outcome:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    events: int = 0
    finish_reason: str | None = None


@dataclass
class Run:
    """Drives the engine as the batcher does: joins before given steps, cancellation after a request's nth
    token; every event is checked against the engine's contract."""

    engine: HFEngine
    joins: dict[int, list[EngineRequest]] = field(default_factory=dict)  # step number -> requests joining
    cancel_after: dict[str, int] = field(default_factory=dict)  # request id -> tokens seen before cancelling
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def __call__(self, batch: list[EngineRequest]) -> dict[str, Outcome]:
        for request in batch + [r for rs in self.joins.values() for r in rs]:
            self.engine.prepare(request)
            self.outcomes[request.request_id] = Outcome()
        self.engine.add(batch)
        step = 0
        while self.engine.num_running or self.joins:
            step += 1
            if step in self.joins:
                self.engine.add(self.joins.pop(step))
            for event in self.engine.step():
                outcome = self.outcomes[event.request_id]
                assert outcome.finish_reason is None, "an event after the request's last one"
                assert not self.is_cancelled(event.request_id), "an event for a cancelled request"
                outcome.text += event.text
                outcome.token_ids += event.token_ids
                outcome.events += event.num_tokens
                outcome.finish_reason = event.finish_reason
            self.engine.abort([rid for rid in self.cancel_after if self.is_cancelled(rid)])
        return self.outcomes

    def is_cancelled(self, request_id: str) -> bool:
        limit = self.cancel_after.get(request_id)
        return limit is not None and self.outcomes[request_id].events >= limit


def greedy(max_new_tokens: int = 24, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **{"ignore_eos": True, **kwargs})


def alone(engine: HFEngine, prompt: str, params: SamplingParams) -> Outcome:
    return Run(engine)([EngineRequest("alone", prompt, params)])["alone"]


def test_single_greedy_matches_transformers_generate(engine: HFEngine) -> None:
    import torch

    for prompt in PROMPTS[1:3]:
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.inference_mode():
            out = engine.model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
        expected = engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert alone(engine, prompt, greedy(20)).text == expected


def test_repetition_penalty_matches_transformers_generate(engine: HFEngine) -> None:
    import torch

    ids = torch.tensor([engine.tokenizer.encode(PROMPTS[2])])
    with torch.inference_mode():
        out = engine.model.generate(
            ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.5, eos_token_id=None,
        )
    expected = engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert alone(engine, PROMPTS[2], greedy(20, repetition_penalty=1.5)).text == expected
    assert expected != alone(engine, PROMPTS[2], greedy(20)).text


def test_batched_greedy_equals_single_for_very_different_lengths(engine: HFEngine) -> None:
    singles = [alone(engine, p, greedy()).token_ids for p in PROMPTS]
    outcomes = Run(engine)([EngineRequest(f"r{i}", p, greedy()) for i, p in enumerate(PROMPTS)])
    assert [outcomes[f"r{i}"].token_ids for i in range(len(PROMPTS))] == singles
    assert len({tuple(t) for t in singles}) == len(singles)  # discriminative: each continues differently


def test_requests_admitted_mid_batch_equal_single(engine: HFEngine, batch_sizes: list[int]) -> None:
    singles = [alone(engine, p, greedy()).token_ids for p in PROMPTS]
    batch_sizes.clear()
    run = Run(engine, joins={
        3: [EngineRequest("r1", PROMPTS[1], greedy())],
        6: [EngineRequest("r2", PROMPTS[2], greedy()), EngineRequest("r3", PROMPTS[3], greedy())],
    })
    outcomes = run([EngineRequest("r0", PROMPTS[0], greedy())])
    assert [outcomes[f"r{i}"].token_ids for i in range(len(PROMPTS))] == singles
    assert max(batch_sizes) == 4  # the joined requests really decoded together with the first


def test_a_joiner_shorter_than_the_running_rows_equals_single(
    engine: HFEngine, batch_sizes: list[int],
) -> None:
    singles = {p: alone(engine, p, greedy()).token_ids for p in (PROMPTS[0], PROMPTS[3])}
    batch_sizes.clear()
    # the one-token prompt joins rows that already hold ~140 prompt tokens plus 4 generated ones:
    # its cache is left-padded by the merge, so only the mask keeps it from attending to that padding
    run = Run(engine, joins={5: [EngineRequest("short", PROMPTS[0], greedy())]})
    outcomes = run([EngineRequest("long", PROMPTS[3], greedy())])
    assert outcomes["short"].token_ids == singles[PROMPTS[0]]
    assert outcomes["long"].token_ids == singles[PROMPTS[3]]
    assert batch_sizes.count(2) > 10  # the two rows really decoded together


def test_each_row_keeps_its_own_parameters(engine: HFEngine) -> None:
    reference = alone(engine, PROMPTS[1], greedy(24)).text
    stop = reference[8:11]
    outcomes = Run(engine)([
        EngineRequest("greedy", PROMPTS[1], greedy(24)),
        EngineRequest("one", PROMPTS[1], greedy(1)),
        EngineRequest("stop", PROMPTS[1], greedy(24, stop=(stop,))),
    ])
    assert outcomes["greedy"].text == reference and outcomes["greedy"].finish_reason == "length"
    assert outcomes["one"].events == 1 and outcomes["one"].finish_reason == "length"
    assert reference.startswith(outcomes["one"].text)
    assert outcomes["stop"].finish_reason == "stop"
    assert outcomes["stop"].text == reference[: reference.index(stop)]


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: HFEngine) -> None:
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    first = alone(engine, PROMPTS[1], sampled).text
    assert alone(engine, PROMPTS[1], sampled).text == first
    outcomes = Run(engine)([
        EngineRequest("other", PROMPTS[3], greedy()),
        EngineRequest("seeded", PROMPTS[1], sampled),
    ])
    assert outcomes["seeded"].text == first
    other_seed = SamplingParams(max_new_tokens=24, temperature=1.0, seed=8, ignore_eos=True)
    assert alone(engine, PROMPTS[1], other_seed).text != first
    assert first != alone(engine, PROMPTS[1], greedy()).text


def test_cancelled_request_leaves_the_batch(engine: HFEngine, batch_sizes: list[int]) -> None:
    singles = {p: alone(engine, p, greedy(16)).token_ids for p in PROMPTS[:2]}
    batch_sizes.clear()
    run = Run(engine, cancel_after={"gone": 3})
    outcomes = run([
        EngineRequest("a", PROMPTS[0], greedy(16)),
        EngineRequest("gone", PROMPTS[3], greedy(16)),
        EngineRequest("b", PROMPTS[1], greedy(16)),
    ])
    assert outcomes["gone"].events == 3 and outcomes["gone"].finish_reason is None
    assert outcomes["a"].token_ids == singles[PROMPTS[0]] and outcomes["b"].token_ids == singles[PROMPTS[1]]
    assert batch_sizes[:3] == [3, 3, 3] and set(batch_sizes[3:]) == {2}  # compute stops at once


def test_finished_rows_stop_costing_compute(engine: HFEngine, batch_sizes: list[int]) -> None:
    Run(engine)([EngineRequest(f"r{n}", PROMPTS[1], greedy(n)) for n in (2, 4, 6)])
    # prefill (3 rows) then decode steps: token 2 ends r2, token 4 ends r4
    assert batch_sizes == [3, 3, 2, 2, 1, 1]


def test_prompt_too_long_is_refused_before_generating(engine: HFEngine) -> None:
    request = EngineRequest("long", "word " * 10, greedy(engine.max_model_len))
    with pytest.raises(PromptTooLongError, match="maximum context length"):
        engine.prepare(request)


def test_empty_prompt_still_generates(engine: HFEngine) -> None:
    assert alone(engine, "", greedy(4)).events == 4


def test_streamed_text_is_whole_characters(engine: HFEngine) -> None:
    from workers.engines.hf_sequence import IncrementalDetokenizer

    text = "naïve café: 日本語 🎉 done"
    ids = engine.tokenizer.encode(text)
    detok = IncrementalDetokenizer.after_prompt(engine._decode, [])
    deltas = [detok.push(token) for token in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in d for d in deltas)  # a character split over tokens waits for its last byte


def test_chat_template_renders_chatml(engine: HFEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = engine.render_chat(messages)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("ignore_eos", "finish_reason"), [(False, "stop"), (True, None)])
def test_eos_ends_a_request_unless_ignored(
    engine: HFEngine, ignore_eos: bool, finish_reason: str | None,
) -> None:
    import torch

    from workers.engines.hf_sampling import RowSampler
    from workers.engines.hf_sequence import IncrementalDetokenizer, SequenceState

    request = EngineRequest("r", "x", greedy(8, ignore_eos=ignore_eos))
    engine.prepare(request)
    seq = SequenceState(
        request, RowSampler(request.params, request.prompt_token_ids, 4096, torch.device("cpu")),
        IncrementalDetokenizer.after_prompt(engine._decode, request.prompt_token_ids),
        eos_ids=frozenset({engine.tokenizer.eos_token_id}), max_total_tokens=engine.max_model_len,
    )
    event = seq.append(engine.tokenizer.eos_token_id)
    assert event.finish_reason == finish_reason and event.text == ""


def test_suspended_rows_resume_where_they_stopped(engine: HFEngine) -> None:
    requests = [EngineRequest(f"r{i}", p, greedy()) for i, p in enumerate(PROMPTS[:3])]
    singles = [alone(engine, r.prompt, greedy()).token_ids for r in requests]
    run = Run(engine, joins={9: [requests[1], requests[2]]})  # resumed: prefilled from prompt + tokens
    original_step = engine.step
    calls = [0]

    def step_then_suspend() -> list[Any]:
        calls[0] += 1
        events = original_step()
        if calls[0] == 4:
            engine.suspend(["r1", "r2"])  # after 4 tokens, two rows wait (an out-of-memory split)
        return events

    engine.step = step_then_suspend  # type: ignore[method-assign]
    try:
        outcomes = run(requests)
    finally:
        del engine.step
    assert [outcomes[r.request_id].token_ids for r in requests] == singles
    assert [len(t) for t in singles] == [24, 24, 24]


def test_a_step_that_runs_out_of_memory_loses_nothing(engine: HFEngine) -> None:
    import torch

    requests = [EngineRequest(f"r{i}", p, greedy(16)) for i, p in enumerate(PROMPTS)]
    singles = [alone(engine, r.prompt, greedy(16)).token_ids for r in requests]
    decode_steps = [0]

    def out_of_memory(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape == (4, 1):  # a decode step of all four rows ...
            decode_steps[0] += 1
            if decode_steps[0] == 5:  # ... after they hold a few tokens
                raise torch.OutOfMemoryError("CUDA out of memory")

    handle = engine.model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    try:
        for request in requests:
            engine.prepare(request)
        engine.add(requests)
        failures = 0
        while engine.num_running or any(r.request_id in engine._suspended for r in requests):
            try:
                events = engine.step()
            except torch.OutOfMemoryError:  # what the batcher does: set the newest rows aside
                failures += 1
                engine.suspend(["r2", "r3"])
                continue
            for event in events:
                tokens[event.request_id] += event.token_ids
            if not engine.num_running:
                engine.add([r for r in requests if r.request_id in engine._suspended])
    finally:
        handle.remove()
    assert failures == 1
    assert [tokens[r.request_id] for r in requests] == singles
