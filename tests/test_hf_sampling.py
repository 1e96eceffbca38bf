"""Per-row token choice: greedy rows take the argmax; sampled rows follow their own distribution."""

from __future__ import annotations

import torch

from workers.engines.base import SamplingParams
from workers.engines.hf_sampling import RowSampler, choose_tokens

CPU = torch.device("cpu")
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.2, 1.5]])  # [1, V=8]


def sampler(**params: object) -> RowSampler:
    return RowSampler(SamplingParams(**params), [], LOGITS.shape[-1], CPU)  # type: ignore[arg-type]


def draws(row: RowSampler, n: int) -> torch.Tensor:
    counts = torch.zeros(LOGITS.shape[-1])
    for _ in range(n):
        counts[choose_tokens(LOGITS, [row])[0]] += 1
    return counts / n


def test_sampled_frequencies_follow_the_tempered_softmax() -> None:
    freq = draws(sampler(temperature=0.7, seed=1), 4000)
    assert torch.allclose(freq, torch.softmax(LOGITS[0] / 0.7, -1), atol=0.03)


def test_top_k_keeps_only_the_k_best() -> None:
    assert set(draws(sampler(temperature=1.0, top_k=2, seed=2), 500).nonzero()[:, 0].tolist()) == {0, 7}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS[0], -1)  # token 0 alone has ~0.38, tokens 0 and 7 ~0.68
    assert 0.3 < float(probs[0]) < 0.5
    assert set(draws(sampler(temperature=1.0, top_p=0.5, seed=3), 500).nonzero()[:, 0].tolist()) == {0, 7}


def test_rows_in_one_batch_keep_their_own_rules() -> None:
    logits = LOGITS.repeat(3, 1)
    rows = [sampler(temperature=0.0), sampler(temperature=1.0, top_k=1, seed=4),
            sampler(temperature=5.0, seed=5)]
    picks = [choose_tokens(logits, rows) for _ in range(200)]
    assert {p[0] for p in picks} == {0} and {p[1] for p in picks} == {0}
    assert len({p[2] for p in picks}) > 4  # a hot temperature spreads over the vocabulary


def test_same_seed_same_draws() -> None:
    a, b = sampler(temperature=1.0, seed=9), sampler(temperature=1.0, seed=9)
    first = [choose_tokens(LOGITS, [a])[0] for _ in range(50)]
    assert first == [choose_tokens(LOGITS, [b])[0] for _ in range(50)]


def test_repetition_penalty_demotes_seen_tokens() -> None:
    row = RowSampler(SamplingParams(temperature=0.0, repetition_penalty=10.0), [0], LOGITS.shape[-1], CPU)
    assert choose_tokens(LOGITS, [row]) == [7]  # token 0 (2.0 -> 0.2) falls behind token 7 (1.5)
    row.observe(7)
    assert choose_tokens(LOGITS, [row]) == [1]
