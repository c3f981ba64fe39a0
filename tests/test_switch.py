"""The WSD switch rule: batch form vs incremental form vs the product formula."""
import math
import random

import pytest
import torch

from wsd_engine.errors import RequestError, WSDError
from wsd_engine.switch import SwitchState, switch_index, switch_index_logp


def brute(probs, w, gamma):
    """(k, fired, ambiguous) from the product formula in float64; ambiguous when some
    window up to the answer is within 1e-9 of gamma (float rounding may go either way)."""
    n = len(probs)
    ambiguous = False
    for i in range(w, n + 1):
        s = math.prod(p ** (1.0 / w) for p in probs[i - w:i])
        if abs(s - gamma) < 1e-9:
            ambiguous = True
        if s >= gamma:
            return i, True, ambiguous
    return n, False, ambiguous


def incremental(logp, w, gamma, rng):
    st = SwitchState.from_threshold(w, gamma)
    i = 0
    while i < len(logp):
        m = rng.randint(1, 10)
        k = st.update(logp[i:i + m])
        i += m
        if k is not None:
            assert st.finished and st.k == k
            return k, True
    assert st.n_scored == len(logp)
    return len(logp), False


def random_probs(rng, n):
    a, b = rng.choice([(8, 1), (20, 1), (3, 1), (1, 1), (50, 0.5)])
    ps = [rng.betavariate(a, b) for _ in range(n)]
    for j in range(n):  # sprinkle exact 1s and 0s
        r = rng.random()
        if r < 0.05:
            ps[j] = 1.0
        elif r < 0.07:
            ps[j] = 0.0
    return ps


def test_random_vectors_agree():
    rng = random.Random(1234)
    checked = fired = 0
    for _ in range(3000):
        n = rng.randint(0, 40)
        w = rng.randint(1, 8)
        gamma = rng.choice([0.5, 0.7, 0.8, 0.9, 0.95, rng.uniform(0.05, 1.0), 1.0])
        probs = random_probs(rng, n)
        k, f = switch_index(torch.tensor(probs, dtype=torch.float64), w, gamma)
        assert (k, f) == switch_index(probs, w, gamma)
        lp = torch.log(torch.tensor(probs, dtype=torch.float64))
        assert incremental(lp, w, gamma, rng) == (k, f)
        bk, bf, amb = brute(probs, w, gamma)
        if not amb:
            assert (k, f) == (bk, bf), (probs, w, gamma)
            checked += 1
        fired += f
        if f:
            assert w <= k <= n
        else:
            assert k == n
    assert checked > 2900 and 500 < fired < 2700  # windows pass at varied places


def test_fp32_logp_incremental_matches_batch_and_device_tensor_ok():
    rng = random.Random(7)
    for _ in range(500):
        n, w = rng.randint(0, 30), rng.randint(1, 8)
        gamma = rng.uniform(0.3, 0.99)
        logp = torch.log(torch.tensor(random_probs(rng, n), dtype=torch.float32))  # fp32, as a model gives
        expect = switch_index_logp(logp, w, gamma)
        assert incremental(logp, w, gamma, rng) == expect
        assert incremental(logp.tolist(), w, gamma, rng) == expect


def exact_tie():
    """(L, gamma): L an fp32 value near -0.125 with math.log(gamma) == L exactly, so that
    ties are exact on the log scale (sums of up to 8 copies of L are exact in float64)."""
    L = torch.tensor(-0.125, dtype=torch.float32)
    for _ in range(1000):
        x = float(L)
        g = math.exp(x)
        for _ in range(8):  # log is monotone: walk g towards an exact hit
            lg = math.log(g)
            if lg == x:
                return x, g
            g = math.nextafter(g, math.inf if lg < x else -math.inf)
        L = torch.nextafter(L, torch.tensor(-1.0))
    raise AssertionError("no exact tie found")


@pytest.mark.parametrize("w", [1, 2, 3, 5, 6, 7, 8])
def test_exact_ties_pass(w):
    L, gamma = exact_tie()
    assert math.log(gamma) == L
    below = L - 2.0 ** -40   # sums with it stay exact, the mean is strictly below L
    # the mean of the window ending at token 3 + w equals log(gamma) exactly: it passes (>=)
    logp = [-4.0, -4.0, -4.0] + [L] * w + [0.0] * 3
    assert switch_index_logp(logp, w, gamma) == (3 + w, True)
    assert switch_index_logp(torch.tensor(logp, dtype=torch.float32), w, gamma) == (3 + w, True)
    assert switch_index(torch.exp(torch.tensor(logp, dtype=torch.float64)), w, gamma)[1]
    if w >= 2:  # offsets that cancel exactly
        mixed = [-4.0] * 2 + [L - 0.0625, L + 0.0625] + [L] * (w - 2)
        assert switch_index_logp(mixed, w, gamma) == (2 + w, True)
    # just below the tie: no window passes
    logp2 = [-4.0, -4.0, -4.0] + [L] * (w - 1) + [below] + [-4.0]
    assert switch_index_logp(logp2, w, gamma) == (len(logp2), False)
    st = SwitchState(w, math.log(gamma))
    assert st.update(logp[:3]) is None and st.update(logp[3:]) == 3 + w
    st2 = SwitchState(w, math.log(gamma))
    assert all(st2.update([v]) is None for v in logp2)


def test_edge_cases():
    assert switch_index([]) == (0, False)
    assert switch_index(torch.empty(0)) == (0, False)
    assert switch_index([1.0] * 5, window=6) == (5, False)          # n < w never fires
    assert switch_index([1.0] * 6, window=6) == (6, True)
    assert switch_index([1.0] * 6, window=6, threshold=1.0) == (6, True)
    assert switch_index([1.0] * 5 + [0.0] + [1.0] * 6, window=6) == (12, True)  # p=0 blocks windows
    assert switch_index([1.0, 1.0, float("nan"), 1.0, 1.0], window=2) == (2, True)
    assert switch_index([float("nan"), 1.0], window=2) == (2, False)
    assert switch_index([0.9], window=1, threshold=0.9) == (1, True)
    assert switch_index([0.5, 0.9, 0.99], window=1, threshold=0.9) == (2, True)


def test_bad_arguments():
    for w in (0, -1, 1.5, "6", True, None):
        with pytest.raises(RequestError, match="window"):
            switch_index([0.5], window=w)
    for t in (0.0, -0.1, 1.01, float("nan"), float("inf"), "0.8", None):
        with pytest.raises(RequestError, match="threshold"):
            switch_index([0.5], threshold=t)
    with pytest.raises(RequestError, match="1-D"):
        switch_index(torch.ones(2, 3))
    with pytest.raises(RequestError):
        SwitchState(6, 0.1)           # log_gamma > 0
    with pytest.raises(RequestError):
        SwitchState(6, float("nan"))
    with pytest.raises(RequestError):
        SwitchState.from_threshold(6, 0.0)


def test_switch_state_carry_and_truncate():
    st = SwitchState.from_threshold(4, 0.5)
    assert st.n_prev == 0 and st.carry_tensor().tolist() == [0.0, 0.0, 0.0]
    assert st.update(torch.tensor([-1.0, -2.0], dtype=torch.float32)) is None
    assert st.n_scored == 2 and st.n_prev == 2
    c = st.carry_tensor("cpu")
    assert c.dtype == torch.float32 and c.tolist() == [0.0, -1.0, -2.0]
    assert st.update([-3.0, -4.0, -5.0]) is None
    assert st.carried == [-3.0, -4.0, -5.0] and st.carry_tensor().tolist() == [-3.0, -4.0, -5.0]
    st.truncate(3)                    # roll back two tokens
    assert st.n_scored == 3 and st.carried == [-1.0, -2.0, -3.0]
    assert st.update([-0.1, -0.1, -0.1, -0.1]) == 7
    with pytest.raises(WSDError):
        st.update([0.0])
    w1 = SwitchState.from_threshold(1, 0.5)
    assert w1.carry_tensor().shape == (0,) and w1.n_prev == 0
    assert w1.update([]) is None and w1.update([-1.0, -0.1]) == 2
