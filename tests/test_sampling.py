"""Sampling: greedy, seeded reproducibility, masking, and frequencies (statistical)."""
import pytest
import torch

from wsd_engine.errors import RequestError
from wsd_engine.sampling import Sampler, SamplingParams, sample_from_logits


def draws(sampler, logits, n):
    return torch.stack([sampler.sample(logits) for _ in range(n)]).tolist()


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    s = Sampler(SamplingParams(), "cpu")
    for _ in range(20):
        logits = torch.randn(97, generator=g)
        out = s.sample(logits)
        assert out.dtype == torch.int64 and out.dim() == 0 and int(out) == int(torch.argmax(logits))
    ties = torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0])
    assert int(s.sample(ties)) == 1                                  # lowest index among ties
    assert s.sample(ties[None]).shape == (1,)
    assert int(sample_from_logits(ties.to(torch.bfloat16), SamplingParams())) == 1


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=123)
    a = draws(Sampler(p, "cpu"), logits, 50)
    b = draws(Sampler(p, "cpu"), logits, 50)
    assert a == b
    c = draws(Sampler(SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=124), "cpu"), logits, 50)
    assert a != c
    s = Sampler(p, "cpu")
    first = draws(s, logits, 10)
    s.reset()
    assert draws(s, logits, 10) == first
    assert len(set(a)) > 3                                           # it really samples


def test_top_k_masks():
    logits = torch.tensor([0.0, 2.0, 1.0, 2.5, -1.0, 1.9, 0.5, 2.2])
    s = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=5), "cpu")
    seen = set(draws(s, logits, 2000))
    assert seen == {1, 3, 7}
    # ties at the k-th value are all kept
    tie = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    seen = set(draws(Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0), "cpu"), tie, 2000))
    assert seen == {1, 2, 3}


def test_top_p_masks():
    # sorted probabilities 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2): the mass ranked
    # strictly before each is 0, 0.5, 0.8, 0.95; a token is kept iff that mass is < top_p
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    seen = set(draws(Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=3), "cpu"), logits, 2000))
    assert seen == {1, 3}
    seen = set(draws(Sampler(SamplingParams(temperature=1.0, top_p=0.85, seed=3), "cpu"), logits, 2000))
    assert seen == {1, 3, 0}
    seen = set(draws(Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=3), "cpu"), logits, 2000))
    assert seen == {1}                                               # at least one token kept
    seen = set(draws(Sampler(SamplingParams(temperature=1.0, top_p=0.85, top_k=1, seed=3), "cpu"), logits, 500))
    assert seen == {1}


# Hand-written distributions. Q is the softmax of z = logits / temperature (logits are
# temperature * log Q). Sorted: 0.30 (id 3), 0.25 (1), 0.20 (5), 0.08 (2), 0.07 (7),
# 0.05 (4), 0.03 (6), 0.02 (0); the mass ranked strictly before each: 0, .30, .55, .75,
# .83, .90, .95, .98. Every cut below sits >= 0.03 away from a boundary.
Q = [0.02, 0.25, 0.08, 0.30, 0.05, 0.20, 0.03, 0.07]
CASES = {   # (temperature, top_k, top_p) -> {token: probability of being drawn}
    "temperature only": ((1.3, 0, 1.0), dict(enumerate(Q))),
    # top_p 0.8: ids 3, 1, 5 and 2 (mass before .75 < .8); 7 (.83) out. Kept mass .83
    "top_p": ((0.7, 0, 0.8), {3: .30 / .83, 1: .25 / .83, 5: .20 / .83, 2: .08 / .83}),
    # top_p 0.86: 7 (before .83) in, 4 (before .90) out. Kept mass .90
    "top_p wider": ((0.5, 0, 0.86), {3: .30 / .9, 1: .25 / .9, 5: .20 / .9, 2: .08 / .9,
                                     7: .07 / .9}),
    # top_k 5 alone: the same five tokens
    "top_k": ((2.0, 5, 1.0), {3: .30 / .9, 1: .25 / .9, 5: .20 / .9, 2: .08 / .9, 7: .07 / .9}),
    # top_k 3 first: {3, 1, 5} renormalised to .4, .333, .267; then top_p 0.6 on those:
    # mass before 0, .4, .733 -> {3, 1}
    "top_k then top_p": ((1.0, 3, 0.6), {3: .30 / .55, 1: .25 / .55}),
    # top_p 0.25: only the most probable token (the mass before id 1 is .30)
    "top_p one token": ((1.0, 0, 0.25), {3: 1.0}),
}
# 99.99% quantiles of chi-square with 1..7 degrees of freedom
CHI2_9999 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


def case_logits(temperature):
    return temperature * torch.tensor(Q, dtype=torch.float64).log().float()


def check_frequencies(drawn, expect, n):
    """drawn [n] int64 against {token: p}: no token outside `expect`, chi-square below its
    99.99% quantile (deterministic seeds: the same draws every run)."""
    counts = torch.bincount(drawn, minlength=len(Q)).tolist()
    outside = {i: c for i, c in enumerate(counts) if i not in expect and c}
    assert not outside, f"drew masked tokens {outside}"
    assert sum(expect.values()) == pytest.approx(1.0, abs=1e-12)
    if len(expect) == 1:
        assert counts[next(iter(expect))] == n
        return
    stat = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in expect.items())
    assert stat < CHI2_9999[len(expect) - 1], (stat, counts, {i: n * p for i, p in expect.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_match_hand_written_distributions(name):
    (temperature, top_k, top_p), expect = CASES[name]
    n = 20000
    s = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11), "cpu")
    logits = case_logits(temperature)
    drawn = s.sample(logits.expand(n, len(Q)))          # n independent rows, one call
    assert drawn.shape == (n,)
    check_frequencies(drawn, expect, n)
    # one token per call, as the engine draws (the generator advances between calls)
    seq = torch.tensor(draws(s, logits, 3000))
    check_frequencies(seq, expect, 3000)


def test_chi_square_check_has_power():
    """The frequency check rejects nearby wrong distributions: the "top_p" case's tokens
    without id 2 (expected .096; what a cut on the inclusive cumulative mass would keep at
    0.8; drawn here with top_p 0.7), and a softmax 15% too sharp."""
    (temperature, top_k, top_p), expect = CASES["top_p"]
    drawn = Sampler(SamplingParams(temperature=temperature, top_p=0.7, seed=11),
                    "cpu").sample(case_logits(temperature).expand(20000, len(Q)))
    with pytest.raises(AssertionError):
        check_frequencies(drawn, expect, 20000)
    drawn = Sampler(SamplingParams(temperature=1.0, seed=11), "cpu").sample(
        torch.tensor(Q).log().expand(20000, len(Q)) * 1.15)  # a slightly sharper softmax
    with pytest.raises(AssertionError):
        check_frequencies(drawn, dict(enumerate(Q)), 20000)


def test_batched_rows_and_one_off():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.7, seed=9)
    out = sample_from_logits(logits, p)
    assert out.shape == (3,) and out.dtype == torch.int64
    assert torch.equal(out, sample_from_logits(logits, p))           # generator=None: seeded fresh


@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(temperature="1"), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(top_k=-1), dict(top_k=2.5), dict(top_k=True), dict(seed=-1), dict(seed=1.0),
])
def test_bad_params(kw):
    with pytest.raises(RequestError):
        SamplingParams(**kw)
