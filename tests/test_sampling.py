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


def test_frequencies_match_softmax():
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, 2.0, -0.5, 0.8, 1.5])
    temp = 1.3
    s = Sampler(SamplingParams(temperature=temp, seed=11), "cpu")
    counts = torch.bincount(torch.tensor(draws(s, logits, 4000)), minlength=8).double() / 4000
    expect = torch.softmax(logits.double() / temp, dim=0)
    assert (counts - expect).abs().max() < 0.03
    # with top-k / top-p, the kept tokens keep their renormalised proportions
    s = Sampler(SamplingParams(temperature=1.0, top_k=4, top_p=0.9, seed=2), "cpu")
    counts = torch.bincount(torch.tensor(draws(s, logits, 4000)), minlength=8).double() / 4000
    z = logits.double()
    kept = z >= torch.topk(z, 4).values[-1]
    p = torch.softmax(z.masked_fill(~kept, float("-inf")), 0)
    order = torch.argsort(p, descending=True, stable=True)
    before = torch.cumsum(p[order], 0) - p[order]
    keep2 = torch.zeros(8, dtype=torch.bool)
    keep2[order[before < 0.9]] = True
    p = p * keep2
    assert (counts - p / p.sum()).abs().max() < 0.03


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
