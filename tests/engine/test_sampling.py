"""sample_next: greedy, top-k, top-p, masked ids, seeding, and the sampled distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from localvl.engine.sampling import ResolvedSampling, generator_seed, sample_batch, sample_next

LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.9, 1.7, -0.4, 0.0])
ARGMAX = 1


def draws(logits, params, n=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [sample_next(logits, params, generator) for _ in range(n)]


def test_temperature_zero_is_argmax():
    assert set(draws(LOGITS, ResolvedSampling(temperature=0.0), n=20)) == {ARGMAX}


def test_negative_temperature_is_treated_as_greedy():
    assert sample_next(LOGITS, ResolvedSampling(temperature=-1.0)) == ARGMAX


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6])
def test_a_vanishing_temperature_is_greedy_not_a_nan(temperature):
    params = ResolvedSampling(temperature=temperature)
    assert set(draws(LOGITS * 100, params, n=5)) == {ARGMAX}
    assert sample_batch(LOGITS.expand(2, -1), [params, ResolvedSampling(temperature=1.0)], torch.Generator().manual_seed(0))[0] == ARGMAX


def test_seeds_fold_into_what_torch_takes():
    assert generator_seed(7) == 7 and generator_seed(-1) == -1 and generator_seed(2**64 - 1) == 2**64 - 1
    assert generator_seed(2**64 + 7) == 7 and 0 <= generator_seed(-(2**70)) < 2**64
    torch.Generator().manual_seed(generator_seed(-(2**63) - 1))  # in range now


def test_top_k_one_is_argmax_at_any_temperature():
    assert set(draws(LOGITS, ResolvedSampling(temperature=1.0, top_k=1), n=50)) == {ARGMAX}


def test_returns_a_python_int():
    assert type(sample_next(LOGITS, ResolvedSampling())) is int


def test_half_precision_logits_are_accepted():
    assert sample_next(LOGITS.half(), ResolvedSampling(temperature=0.0)) == ARGMAX


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_samples_only_from_the_k_largest_logits(k):
    allowed = set(torch.topk(LOGITS, k).indices.tolist())
    seen = set(draws(LOGITS, ResolvedSampling(temperature=1.0, top_k=k), n=400))
    assert seen <= allowed
    assert len(seen) == k  # and every one of them does occur


def test_top_k_larger_than_vocabulary_is_no_cut():
    seen = set(draws(LOGITS, ResolvedSampling(temperature=1.0, top_k=100), n=2000))
    assert seen == set(range(len(LOGITS)))


def test_top_k_zero_is_no_cut():
    seen = set(draws(LOGITS, ResolvedSampling(temperature=1.0, top_k=0), n=2000))
    assert seen == set(range(len(LOGITS)))


@pytest.mark.parametrize("top_p", [1e-6, 0.01, 0.2])
def test_small_top_p_keeps_only_the_top_token(top_p):
    # the top token alone holds about a third of the mass
    assert set(draws(LOGITS, ResolvedSampling(temperature=1.0, top_p=top_p), n=200)) == {ARGMAX}


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = set(draws(logits, ResolvedSampling(temperature=1.0, top_p=0.75), n=500))
    assert seen == {0, 1}


def test_top_p_zero_keeps_only_the_top_token():
    assert sample_next(LOGITS, ResolvedSampling(temperature=1.0, top_p=0.0)) == ARGMAX


@pytest.mark.parametrize(
    "params",
    [
        ResolvedSampling(temperature=1.0),
        ResolvedSampling(temperature=1.0, top_k=3),
        ResolvedSampling(temperature=1.0, top_p=0.999),
        ResolvedSampling(temperature=0.0),
    ],
    ids=["plain", "top_k", "top_p", "greedy"],
)
def test_minus_infinity_logits_are_never_sampled(params):
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.1, float("-inf"), -0.1])
    seen = set(draws(logits, params, n=500))
    assert seen <= {1, 3, 5}


def test_a_single_finite_logit_is_always_chosen():
    logits = torch.full((50,), float("-inf"))
    logits[17] = -3.0
    assert set(draws(logits, ResolvedSampling(temperature=1.0, top_k=5), n=50)) == {17}


def test_seeded_generator_reproduces_samples():
    params = ResolvedSampling(temperature=1.0, top_p=0.9, top_k=6)
    assert draws(LOGITS, params, n=100, seed=42) == draws(LOGITS, params, n=100, seed=42)


def test_different_seeds_give_different_samples():
    params = ResolvedSampling(temperature=1.0)
    assert draws(LOGITS, params, n=100, seed=1) != draws(LOGITS, params, n=100, seed=2)


def test_temperature_one_follows_softmax():
    n = 8000
    counts = Counter(draws(LOGITS, ResolvedSampling(temperature=1.0), n=n, seed=7))
    expected = torch.softmax(LOGITS, dim=-1).tolist()
    for token, p in enumerate(expected):
        # binomial std is at most 0.0056 here: 0.025 is a generous bound (> 4 sigma)
        assert abs(counts[token] / n - p) < 0.025, (token, counts[token] / n, p)


def test_lower_temperature_sharpens_the_distribution():
    n = 3000
    hot = Counter(draws(LOGITS, ResolvedSampling(temperature=1.0), n=n, seed=3))
    cold = Counter(draws(LOGITS, ResolvedSampling(temperature=0.3), n=n, seed=3))
    expected_cold = torch.softmax(LOGITS / 0.3, dim=-1)[ARGMAX].item()
    assert cold[ARGMAX] > hot[ARGMAX]
    assert abs(cold[ARGMAX] / n - expected_cold) < 0.04


# sample_batch: many rows, each under its own parameters, in one set of tensor operations.


def batch_draws(rows_params, n=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = LOGITS.expand(len(rows_params), -1)
    counts = [Counter() for _ in rows_params]
    for _ in range(n):
        for counter, token in zip(counts, sample_batch(logits, rows_params, generator)):
            counter[token] += 1
    return counts


def test_batch_mixes_greedy_top_k_and_top_p_rows():
    params = [
        ResolvedSampling(temperature=0.0),
        ResolvedSampling(temperature=1.0, top_k=2),
        ResolvedSampling(temperature=1.0, top_p=0.5),
        ResolvedSampling(temperature=1.0, top_k=1),
        ResolvedSampling(temperature=1.0),
    ]
    greedy, top2, nucleus, k1, free = batch_draws(params)
    assert set(greedy) == {ARGMAX} and set(k1) == {ARGMAX}
    assert set(top2) == {1, 5}  # the two largest logits, 2.0 and 1.7
    # top_p 0.5: softmax mass of 2.0 alone is < 0.5, with 1.7 it is over: exactly those two
    assert set(nucleus) == {1, 5}
    assert len(free) >= 6  # untruncated: nearly every token shows up in 300 draws


def test_batch_draws_follow_each_rows_distribution():
    params = [ResolvedSampling(temperature=1.0), ResolvedSampling(temperature=0.3)]
    counts = batch_draws(params, n=3000)
    for counter, temperature in zip(counts, (1.0, 0.3)):
        expected = torch.softmax(LOGITS / temperature, dim=-1)
        for token, p in enumerate(expected.tolist()):
            assert abs(counter[token] / 3000 - p) < 0.035


def test_batch_never_samples_minus_infinity():
    logits = LOGITS.clone()
    logits[ARGMAX] = float("-inf")
    rows = logits.expand(3, -1)
    params = [ResolvedSampling(temperature=2.0), ResolvedSampling(temperature=1.0, top_p=0.9), ResolvedSampling(temperature=0.0)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        assert ARGMAX not in sample_batch(rows, params, generator)


def test_batch_of_greedy_rows_is_argmax_and_returns_ints():
    out = sample_batch(torch.stack([LOGITS, -LOGITS]), [ResolvedSampling(temperature=0.0)] * 2)
    assert out == [ARGMAX, int(torch.argmax(-LOGITS))] and all(type(t) is int for t in out)


def test_cut_rows_follow_the_renormalised_distribution_of_what_they_keep():
    """top-k 3, and top-p 0.9 (which keeps 5 of these 8 tokens): the kept tokens are drawn in
    proportion to their probabilities, renormalised."""
    params = [ResolvedSampling(temperature=1.0, top_k=3), ResolvedSampling(temperature=1.0, top_p=0.9)]
    counts = batch_draws(params, n=4000, seed=5)
    probs = torch.softmax(LOGITS, dim=-1)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], dim=0) - probs[order]
    assert int((before < 0.9).sum()) == 5
    for counter, kept in zip(counts, (order[:3], order[:5])):
        expected = torch.zeros_like(probs)
        expected[kept] = probs[kept] / probs[kept].sum()
        for token, p in enumerate(expected.tolist()):
            assert abs(counter[token] / 4000 - p) < 0.03, (token, counter[token] / 4000, p)


def test_a_nucleus_wider_than_the_candidates_is_drawn_over_the_whole_vocabulary():
    from localvl.engine.sampling import CANDIDATES

    vocab = 4 * CANDIDATES
    logits = -torch.arange(vocab, dtype=torch.float32) * 1e-3  # nearly flat, all distinct
    probs = torch.softmax(logits, dim=-1)
    boundary = int((torch.cumsum(probs, dim=0) - probs < 0.8).sum())  # the nucleus: tokens below it
    assert boundary > CANDIDATES
    generator = torch.Generator().manual_seed(0)
    rows = logits.expand(2, -1)
    params = [ResolvedSampling(top_p=0.8), ResolvedSampling(top_k=5)]
    seen = [sample_batch(rows, params, generator) for _ in range(300)]
    wide = [row[0] for row in seen]
    assert max(wide) < boundary and max(wide) > CANDIDATES  # beyond the candidates, never past the nucleus
    assert {row[1] for row in seen} <= set(range(5))


from localvl.engine.sampling import apply_penalties  # noqa: E402

NONE = torch.tensor([], dtype=torch.long)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = LOGITS.clone().unsqueeze(0)
    apply_penalties(logits, [0], [ResolvedSampling(repetition_penalty=2.0)], [torch.tensor([1])], [[2]])
    row = logits[0]
    assert row[1] == LOGITS[1] / 2 and row[2] == LOGITS[2] * 2  # a prompt id, a generated one
    assert torch.equal(row[3:], LOGITS[3:]) and row[0] == LOGITS[0]


def test_presence_and_frequency_penalties_count_generated_tokens():
    logits = LOGITS.clone().unsqueeze(0)
    params = ResolvedSampling(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [0], [params], [torch.tensor([1])], [[4, 4, 4, 6]])
    row = logits[0]
    assert torch.isclose(row[4], LOGITS[4] - 0.5 - 0.75) and torch.isclose(row[6], LOGITS[6] - 0.5 - 0.25)
    assert row[1] == LOGITS[1]  # the prompt's ids carry no presence penalty
    assert params.penalised and not ResolvedSampling().penalised


def test_a_batch_is_penalised_as_its_rows_alone_and_as_transformers_does():
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 50, generator=generator) * 5
    params = [ResolvedSampling(repetition_penalty=1.3), ResolvedSampling(), ResolvedSampling(frequency_penalty=0.7),
              ResolvedSampling(repetition_penalty=0.8, presence_penalty=-0.4)]
    prompts = [torch.tensor([3, 7, 9]), torch.tensor([1]), torch.tensor([2, 5]), torch.tensor([0, 49])]
    outputs = [[7, 11, 11], [4], [5, 5, 6], []]
    together = batch.clone()
    apply_penalties(together, [0, 2, 3], [params[i] for i in (0, 2, 3)], [prompts[i] for i in (0, 2, 3)], [outputs[i] for i in (0, 2, 3)])
    assert torch.equal(together[1], batch[1])  # a row not named is left alone
    for i in (0, 2, 3):
        alone = batch[i : i + 1].clone()
        apply_penalties(alone, [0], [params[i]], [prompts[i]], [outputs[i]])
        assert torch.equal(together[i], alone[0])
    seen = torch.tensor([[3, 7, 9, 7, 11, 11]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, batch[:1].clone())
    assert torch.equal(together[0], expected[0])
