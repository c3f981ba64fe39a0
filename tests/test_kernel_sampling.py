"""Sampling kernel: greedy exactness, masks never violated, frequencies, reproducibility."""
import pytest
import torch

from wsd_engine.kernels.sampling import sample, sample_probs_ref, sample_ref


def _chi2(draws, probs, n_bins):
    """Chi-square statistic of integer draws against probs, merging bins expected < 5."""
    n = draws.numel()
    obs = torch.bincount(draws.cpu(), minlength=n_bins).double()
    exp = probs.double().cpu() * n
    assert obs[exp == 0].sum() == 0, "drew a token of probability 0"
    big = exp >= 5
    stat = ((obs[big] - exp[big]) ** 2 / exp[big]).sum()
    rest_o, rest_e = obs[~big & (exp > 0)].sum(), exp[~big & (exp > 0)].sum()
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
    dof = int(big.sum()) + int(rest_e > 0) - 1
    return float(stat), dof


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1000, 32003])
def test_greedy_is_argmax_lowest_index(dtype, V):
    torch.manual_seed(0)
    logits = torch.randn(3, V).to(dtype)                               # [B, V]
    logits[1, 17] = logits[1, V - 2] = logits[1].max() + 1              # tie: 17 wins
    out = sample(logits, 0.0)
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert torch.equal(out, logits.float().argmax(-1))
    assert out[1].item() == 17
    one = sample(logits[2], 0.0, top_k=5, top_p=0.5, seed=3, offset=9)  # filters ignored
    assert one.shape == (1,) and one.item() == logits[2].float().argmax().item()
    assert torch.equal(sample_ref(logits, 0.0), out)


@pytest.mark.parametrize(
    "V,temperature,top_k,top_p",
    [(1000, 1.0, 20, 1.0), (1000, 0.7, 0, 0.8), (1000, 1.3, 50, 0.6), (32003, 1.0, 7, 0.95)],
)
def test_masked_tokens_never_drawn(V, temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(V) * 2                                        # [V]
    kept = sample_probs_ref(logits, temperature, top_k, top_p)[0] > 0  # [V]
    n, seeds = (100, (5, 6, 2**40 + 7)) if V <= 1000 else (6, (5,))
    draws = torch.cat([sample(logits.expand(n, V), temperature, top_k, top_p, seed=s, offset=0)
                       for s in seeds])                                # [n * len(seeds)]
    assert kept[draws].all(), sorted(set(draws.tolist()) - set(kept.nonzero()[:, 0].tolist()))
    if V <= 1000:
        assert len(set(draws.tolist())) > 1


def test_top_k_ties_at_kth_value_all_kept():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0, -1.0, 0.5])
    probs = sample_probs_ref(logits, 1.0, top_k=2)[0]
    assert (probs > 0).tolist() == [True, False, True, True, False, True, False, False]
    draws = sample(logits.expand(500, 8), 1.0, top_k=2, seed=2, offset=0)
    assert set(draws.tolist()) == {0, 2, 3, 5}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 0.9), (1.5, 0, 0.7)])
def test_frequencies_match_probabilities(temperature, top_k, top_p):
    torch.manual_seed(2)
    V, n = 8, 2000
    logits = torch.randn(V) * 1.2
    probs = sample_probs_ref(logits, temperature, top_k, top_p)[0]     # [V]
    draws = sample(logits.expand(n, V), temperature, top_k, top_p, seed=1234, offset=0)
    stat, dof = _chi2(draws, probs, V)
    # chi-square 99.99% quantile is < 30 for dof <= 7; deterministic seed, so no flakes
    assert stat < 30.0, (stat, dof, torch.bincount(draws, minlength=V), probs * n)
    # the torch reference draws from the same distribution
    g = torch.Generator().manual_seed(0)
    ref_draws = sample_ref(logits.expand(n, V), temperature, top_k, top_p, generator=g)
    assert _chi2(ref_draws, probs, V)[0] < 30.0


# the hand-written distributions of the torch sampler's test, written out (and explained) there
from test_sampling import CASES as HAND, CHI2_9999, Q  # noqa: E402


@pytest.mark.parametrize("name", list(HAND))
def test_frequencies_match_hand_written_distributions(name):
    (temperature, top_k, top_p), expect = HAND[name]
    p_hand = torch.tensor([expect.get(i, 0.0) for i in range(len(Q))])     # [8]
    logits = temperature * torch.tensor(Q, dtype=torch.float64).log().float()
    # the torch reference's distribution, which the other tests use as their expectation
    torch.testing.assert_close(sample_probs_ref(logits, temperature, top_k, top_p)[0], p_hand,
                               atol=1e-6, rtol=0)
    n = 20000
    draws = sample(logits.expand(n, len(Q)), temperature, top_k, top_p, seed=99, offset=0)
    counts = torch.bincount(draws, minlength=len(Q))
    assert counts[p_hand == 0].sum() == 0, counts                    # masked: never drawn
    if len(expect) == 1:
        assert counts[3] == n
    else:
        stat, dof = _chi2(draws, p_hand, len(Q))
        assert dof == len(expect) - 1
        assert stat < CHI2_9999[dof], (stat, counts, p_hand * n)   # deterministic seed


def test_reproducible_and_batch_rows_use_offset_plus_row():
    torch.manual_seed(3)
    logits = torch.randn(4, 1000)                                      # [B, V]
    a = sample(logits, 1.0, 0, 0.9, seed=7, offset=11)
    b = sample(logits, 1.0, 0, 0.9, seed=torch.tensor([7]), offset=torch.tensor([11]))
    assert torch.equal(a, b)
    rows = torch.cat([sample(logits[r], 1.0, 0, 0.9, seed=7, offset=11 + r) for r in range(4)])
    assert torch.equal(a, rows)
    flat = torch.zeros(1000)                                           # uniform: draws spread
    by_offset = {sample(flat, 1.0, seed=7, offset=o).item() for o in range(20)}
    by_seed = {sample(flat, 1.0, seed=s, offset=0).item() for s in range(20)}
    assert len(by_offset) > 10 and len(by_seed) > 10


def test_sampling_validation():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="temperature"):
        sample(x, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(x, 1.0, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample(x, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="seed"):
        sample(x, 1.0, seed=-3)
    with pytest.raises(ValueError, match="offset"):
        sample(x, 1.0, offset=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(2, 3, 4), 1.0)


@pytest.mark.gpu
def test_sampling_llama8b_vocab_bf16_gpu():
    torch.manual_seed(4)
    V = 128256
    logits = (torch.randn(V, device="cuda") * 3).to(torch.bfloat16)
    assert sample(logits, 0.0).item() == logits.float().argmax().item()
    kept = sample_probs_ref(logits, 0.8, 40, 0.9)[0] > 0
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    draws = []
    for _ in range(200):                                   # graph-style: offset advanced on device
        draws.append(sample(logits, 0.8, 40, 0.9, seed=123, offset=offset))
        offset += 1
    draws = torch.cat(draws)
    assert kept[draws].all()
    small = torch.randn(8, device="cuda")
    probs = sample_probs_ref(small, 1.0)[0]
    d = sample(small.expand(2000, 8), 1.0, seed=9, offset=0)
    assert _chi2(d, probs, 8)[0] < 30.0
