"""switch_score (fused lm_head + log-softmax + WSD window) against its torch reference, and
its switch decision against the canonical float64 rule (wsd_engine.switch) on log-probs
computed independently in float64."""
import math
import random

import pytest
import torch

from wsd_engine.kernels.switch_score import (
    SwitchScore,
    switch_score,
    switch_score_ref,
    switch_window,
    switch_window_ref,
)
from wsd_engine.switch import switch_index_logp, window_means


def _inputs(c, V, d, dtype, window, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(c, d, generator=g).to(device=device, dtype=dtype)            # [c, d]
    weight = (torch.randn(V, d, generator=g) * d ** -0.5 * 4).to(device=device, dtype=dtype)  # [V, d]
    ids = torch.randint(0, V, (c,), generator=g).to(device)                          # [c]
    carry = (-torch.rand(window - 1, generator=g) * 3).to(device)                    # [w-1]
    return hidden, weight, ids, carry


def _threshold_between_means(mean):
    """A log_gamma half-way between two distinct defined means (no near-ties), or -1.0."""
    vals = torch.unique(mean[~mean.isnan()].float().cpu())
    if len(vals) < 2:
        return -1.0
    i = len(vals) // 2
    return float((vals[i - 1] + vals[i]) / 2)


def _check(out, ref, atol=1e-5, rtol=1e-5, exact_argmax=True):
    assert isinstance(out, SwitchScore)
    torch.testing.assert_close(out.logp, ref.logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.lse, ref.lse, atol=atol, rtol=rtol)
    if exact_argmax:
        assert torch.equal(out.argmax, ref.argmax)
    torch.testing.assert_close(out.mean, ref.mean, atol=atol, rtol=rtol, equal_nan=True)
    assert out.first.dtype == torch.int32 and out.first.shape == (1,)
    assert out.first.item() == ref.first.item()


@pytest.mark.parametrize(
    "c,V,d,dtype,window,n_prev,kw",
    [
        (1, 1000, 72, torch.float32, 1, 0, {}),
        (7, 1000, 96, torch.float32, 6, 0, dict(block_v=128, tiles_per_prog=2, block_p=2)),
        (7, 1000, 72, torch.float32, 6, 3, dict(block_v=256, tiles_per_prog=1)),
        (64, 32003, 96, torch.float32, 8, 20, {}),
        (7, 32003, 72, torch.bfloat16, 4, 2, dict(block_v=2048, block_d=32)),
        (8, 1000, 96, torch.float16, 3, 9, {}),
    ],
)
def test_switch_score_matches_ref(c, V, d, dtype, window, n_prev, kw):
    hidden, weight, ids, carry = _inputs(c, V, d, dtype, window)
    probe = switch_score_ref(hidden, weight, ids, carry, n_prev, window, 0.0)
    log_gamma = _threshold_between_means(probe.mean)
    ref = switch_score_ref(hidden, weight, ids, carry, n_prev, window, log_gamma)
    out = switch_score(hidden, weight, ids, carry, n_prev, window, log_gamma, **kw)
    _check(out, ref)


def test_argmax_ties_lowest_index_across_programs():
    # Small integers: every logit is exact, so ties are real ties in any summation order.
    torch.manual_seed(1)
    c, V, d = 7, 1000, 72
    hidden = torch.randint(-2, 3, (c, d)).float()
    weight = torch.randint(-1, 2, (V, d)).float()
    weight[900] = weight[5]          # same row in another program: index 5 must win
    weight[6] = weight[5]
    hidden[0] = weight[5]            # row 0's max sits at 5, 6 and 900
    ids = torch.randint(0, V, (c,))
    carry = torch.zeros(0)
    ref = switch_score_ref(hidden, weight, ids, carry, 0, 1, -1.0)
    out = switch_score(hidden, weight, ids, carry, 0, 1, -1.0, block_v=128, tiles_per_prog=2)
    assert out.argmax[0].item() == 5
    assert torch.equal(out.argmax, ref.argmax)
    torch.testing.assert_close(out.logp, ref.logp, atol=1e-5, rtol=1e-5)


def test_n_prev_tensor_out_buffers_and_strided_hidden():
    c, V, d, window = 5, 1000, 72, 6
    hidden, weight, ids, carry = _inputs(c, V, d, torch.float32, window, seed=3)
    wide = torch.randn(c, 2 * d)
    wide[:, 3:3 + d] = hidden
    strided = wide[:, 3:3 + d]                                   # row stride 2d
    ref = switch_score_ref(hidden, weight, ids.int(), carry, 2, window, -3.0)
    out = SwitchScore(torch.empty(c), torch.empty(c), torch.empty(c, dtype=torch.int64),
                      torch.empty(c), torch.empty(1, dtype=torch.int32))
    got = switch_score(strided, weight, ids.int(), carry, torch.tensor([2]), window, -3.0, out=out)
    assert got is out
    _check(out, ref)


def test_window_logic_matches_ref_1000_cases():
    """The switch decision on crafted log p's, many of them sitting on the threshold."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    n_fired = n_never = n_near = n_f64 = 0
    for case in range(1000):
        window = rng.randint(1, 8)
        c = rng.choice([1, 2, 3, 5, 8, 13, 16, 33, 64])
        n_prev = rng.choice([0, rng.randint(0, window - 1), rng.randint(window, 50)])
        carry = -torch.rand(window - 1, generator=g) * rng.choice([0.05, 0.5, 3.0])
        logp = -torch.rand(c, generator=g) * rng.choice([0.05, 0.5, 3.0])
        probe, _ = switch_window_ref(logp, carry, n_prev, window, 0.0)
        defined = probe[~probe.isnan()]
        r = rng.random()
        if len(defined) and r < 0.75:       # on or within +-1e-3 of a window mean
            log_gamma = defined[rng.randrange(len(defined))].item()
            log_gamma += rng.choice([0.0, 0.0, rng.uniform(-1e-3, 1e-3), 1e-7, -1e-7])
            n_near += 1
        elif r < 0.85:                      # above every mean: never fires
            log_gamma = 0.5
        else:
            log_gamma = -rng.uniform(0.0, 3.0)
        mean_ref, first_ref = switch_window_ref(logp, carry, n_prev, window, log_gamma)
        n_arg = torch.tensor([n_prev], dtype=rng.choice([torch.int32, torch.int64])) \
            if case % 2 else n_prev
        out = switch_window(logp, carry, n_arg, window, log_gamma)
        msg = f"case {case}: w={window} c={c} n_prev={n_prev} log_gamma={log_gamma!r}"
        assert out.first.item() == first_ref.item(), msg
        assert torch.equal(out.mean.isnan(), mean_ref.isnan()), msg
        assert torch.equal(out.mean.nan_to_num(), mean_ref.nan_to_num()), msg   # bit-exact
        assert torch.equal(out.logp, logp), msg
        # the canonical float64 rule on the same values, wherever log_gamma is not within
        # fp32 rounding of a window mean (both must then decide alike)
        ext64 = torch.cat([carry, logp]).double()                     # [w-1+c]
        means64 = window_means(ext64, window)                         # [c]: window j
        defined = torch.arange(c) + n_prev + 1 >= window
        if not (defined & ((means64 - log_gamma).abs() < 1e-5)).any():
            hits = (defined & (means64 >= log_gamma)).nonzero()
            assert out.first.item() == (hits[0, 0].item() if len(hits) else -1), msg
            n_f64 += 1
        n_fired += first_ref.item() >= 0
        n_never += first_ref.item() < 0
    assert n_fired > 300 and n_never > 100 and n_near > 500 and n_f64 > 250


def _logp64(hidden, weight, ids):
    """log p of ids under softmax(hidden @ weight.T), all in float64: independent of the
    kernel's fp32 arithmetic (and of switch_score_ref)."""
    logits = hidden.double() @ weight.double().T                       # [N, V]
    return torch.log_softmax(logits, -1).gather(1, ids.long()[:, None])[:, 0]


def _kernel_switch(score, n_tokens, window, log_gamma, chunk, n_prev_tensor=False):
    """The kernel fed chunk by chunk, as the engine feeds it: carry = the last window-1 log
    p's it returned (oldest first, left-padded with 0), n_prev = tokens scored before.
    score(start, stop, carry, n_prev) -> SwitchScore of tokens [start, stop).
    Returns (k, fired, {1-based i: window mean ending at i})."""
    logps, means = [], {}
    n = 0
    while n < n_tokens:
        c = min(chunk, n_tokens - n)
        carry = torch.zeros(window - 1)
        prev = logps[max(0, len(logps) - (window - 1)):] if window > 1 else []
        if prev:
            carry[window - 1 - len(prev):] = torch.tensor(prev)
        n_prev = torch.tensor([n]) if n_prev_tensor else n
        out = score(n, n + c, carry, n_prev)
        logps.extend(out.logp.tolist())
        for j in range(c):
            if n + j + 1 >= window:
                means[n + j + 1] = out.mean[j].item()
            else:
                assert math.isnan(out.mean[j].item())
        f = out.first.item()
        if f >= 0:
            return n + f + 1, True, means
        n += c
    return n_tokens, False, means


def _threshold_near_a_mean(rng, means64, min_gap):
    """(log_gamma, kind): close to a window mean (within 1e-2), never within `min_gap` of
    any mean (well outside fp32 rounding, so float64 and fp32 must decide alike)."""
    while True:
        r = rng.random()
        delta = rng.uniform(1e-3, 1e-2)
        if r < 0.6:                       # just above or below a random window's mean
            kind, lg = "near", means64[rng.randrange(len(means64))] + rng.choice([-1, 1]) * delta
        elif r < 0.8:                     # just below the first window: k = w
            kind, lg = "first", means64[0] - delta
        else:                             # just above every mean: never fires
            kind, lg = "never", max(means64) + delta
        lg = min(lg, 0.0)                 # threshold <= 1
        if min(abs(m - lg) for m in means64) > min_gap:
            return lg, kind


def test_kernel_decision_matches_float64_rule_across_chunks():
    """First firing index of the kernel, fed chunk by chunk with the carried log p's, ==
    switch_index_logp (float64 rule) on log p computed in float64, on fresh random inputs;
    thresholds within 1e-2 of a window mean but >= 5e-4 from every mean."""
    rng = random.Random(7)
    g = torch.Generator().manual_seed(7)
    V, d = 1000, 72
    n_fired = n_never = n_first = n_straddle = 0
    for case in range(24):
        window = rng.randint(1, 8)
        chunk = rng.choice([1, 3, 5, 8])
        n_tokens = rng.randint(window, 24)
        hidden = torch.randn(n_tokens, d, generator=g)                    # [N, d]
        weight = torch.randn(V, d, generator=g) * d ** -0.5 * rng.choice([1.0, 4.0])  # [V, d]
        ids = torch.randint(0, V, (n_tokens,), generator=g)
        # some draft tokens are the base's favourite (high log p), like a real draft
        fav = (hidden @ weight.T).argmax(-1)
        pick = torch.rand(n_tokens, generator=g) < 0.5
        ids = torch.where(pick, fav, ids)
        lp64 = _logp64(hidden, weight, ids)                                # [N] float64
        means64 = window_means(lp64, window).tolist()                     # [N - w + 1]
        log_gamma, kind = _threshold_near_a_mean(rng, means64, 5e-4)
        gamma = math.exp(log_gamma)
        want_k, want_fired = switch_index_logp(lp64, window, gamma)
        k, fired, means = _kernel_switch(
            lambda a, b, carry, n_prev: switch_score(hidden[a:b], weight, ids[a:b], carry,
                                                     n_prev, window, math.log(gamma)),
            n_tokens, window, math.log(gamma), chunk, n_prev_tensor=case % 2 == 1)
        msg = f"case {case}: w={window} chunk={chunk} N={n_tokens} {kind} lg={log_gamma!r}"
        assert (k, fired) == (want_k, want_fired), msg
        for i, m in means.items():                                        # fp32 vs float64
            assert abs(m - means64[i - window]) < 2e-5, (msg, i)
        n_fired += fired
        n_never += not fired
        n_first += fired and k == window
        n_straddle += fired and window > 1 and (k - window) // chunk != (k - 1) // chunk
    assert n_fired >= 12 and n_never >= 4 and n_first >= 6 and n_straddle >= 8, \
        (n_fired, n_never, n_first, n_straddle)


def test_window_kernel_decision_matches_float64_rule_across_chunks():
    """The same for the window half alone (switch_window on given fp32 log p's, the
    canonical rule on those values upcast), many more cases: thresholds within 1e-2 of a
    window mean but >= 1e-4 from every mean (fp32 window sums err by < 1e-5 here)."""
    rng = random.Random(8)
    g = torch.Generator().manual_seed(8)
    n_fired = n_never = n_first = n_straddle = 0
    for case in range(100):
        window = rng.randint(1, 8)
        chunk = rng.choice([1, 2, 3, 5, 8, 13])
        n_tokens = rng.randint(window, 30)
        lp32 = -torch.rand(n_tokens, generator=g) * rng.choice([0.05, 0.5, 3.0])   # [N] fp32
        lp64 = lp32.double()
        means64 = window_means(lp64, window).tolist()
        log_gamma, kind = _threshold_near_a_mean(rng, means64, 1e-4)
        gamma = math.exp(log_gamma)
        want_k, want_fired = switch_index_logp(lp64, window, gamma)
        k, fired, means = _kernel_switch(
            lambda a, b, carry, n_prev: switch_window(lp32[a:b].contiguous(), carry, n_prev,
                                                      window, math.log(gamma)),
            n_tokens, window, math.log(gamma), chunk, n_prev_tensor=case % 2 == 1)
        msg = f"case {case}: w={window} chunk={chunk} N={n_tokens} {kind} lg={log_gamma!r}"
        assert (k, fired) == (want_k, want_fired), msg
        for i, m in means.items():
            assert abs(m - means64[i - window]) < 1e-5, (msg, i)
        n_fired += fired
        n_never += not fired
        n_first += fired and k == window
        n_straddle += fired and window > 1 and (k - window) // chunk != (k - 1) // chunk
    assert n_fired >= 50 and n_never >= 20 and n_first >= 30 and n_straddle >= 25, \
        (n_fired, n_never, n_first, n_straddle)


def test_window_undefined_before_w_tokens():
    # w = 6, every mean passes: first = the first j with i = n_prev + j + 1 >= 6, if any.
    logp = torch.full((4,), -0.01)
    carry = torch.full((5,), -0.01)
    for n_prev, expect in ((0, -1), (1, -1), (2, 3), (4, 1), (5, 0), (40, 0)):
        out = switch_window(logp, carry, n_prev, 6, -0.5)
        assert out.first.item() == expect, n_prev
        n_undef = 4 if expect < 0 else expect
        assert out.mean[:n_undef].isnan().all() and not out.mean[n_undef:].isnan().any()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda h, w, i, c: (h[:, None], w, i, c, 0, 6), "hidden"),
        (lambda h, w, i, c: (h, w[:, :-1], i, c, 0, 6), "weight"),
        (lambda h, w, i, c: (h, w.double(), i, c, 0, 6), "weight"),
        (lambda h, w, i, c: (h, w, i.float(), c, 0, 6), "draft_ids"),
        (lambda h, w, i, c: (h, w, i[:-1], c, 0, 6), "draft_ids"),
        (lambda h, w, i, c: (h, w, i, c[:-1], 0, 6), "carry"),
        (lambda h, w, i, c: (h, w, i, c.double(), 0, 6), "carry"),
        (lambda h, w, i, c: (h, w, i, c, -1, 6), "n_prev"),
        (lambda h, w, i, c: (h, w, i, c, torch.tensor([1.0]), 6), "n_prev"),
        (lambda h, w, i, c: (h, w, i, c, 0, 0), "window"),
        (lambda h, w, i, c: (h.repeat(20, 1), w, i.repeat(20), c, 0, 6), "c must be"),
    ],
)
def test_switch_score_validation(make, match):
    hidden, weight, ids, carry = _inputs(4, 50, 16, torch.float32, 6)
    with pytest.raises(ValueError, match=match):
        switch_score(*make(hidden, weight, ids, carry), -0.2)


@pytest.mark.gpu
@pytest.mark.parametrize("n_prev_tensor", [False, True])
def test_switch_score_llama8b_bf16_gpu(n_prev_tensor):
    c, V, d, window = 8, 128256, 4096, 6
    hidden, weight, ids, carry = _inputs(c, V, d, torch.bfloat16, window, device="cuda")
    n_prev = torch.tensor([3], device="cuda") if n_prev_tensor else 3
    probe = switch_score_ref(hidden, weight, ids, carry, 3, window, 0.0)
    log_gamma = _threshold_between_means(probe.mean)
    ref = switch_score_ref(hidden, weight, ids, carry, 3, window, log_gamma)
    out = switch_score(hidden, weight, ids, carry, n_prev, window, log_gamma)
    # bf16 products are exact in fp32; only the 4096-term summation order differs
    _check(out, ref, atol=2e-4, rtol=1e-5, exact_argmax=False)
    logits = hidden.float() @ weight.float().T                      # [c, V]
    picked = logits.gather(1, out.argmax[:, None])[:, 0]
    torch.testing.assert_close(picked, logits.max(-1).values, atol=2e-4, rtol=0)
