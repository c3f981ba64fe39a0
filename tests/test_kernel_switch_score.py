"""switch_score (fused lm_head + log-softmax + WSD window) against its torch reference."""
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
    n_fired = n_never = n_near = 0
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
        n_fired += first_ref.item() >= 0
        n_never += first_ref.item() < 0
    assert n_fired > 300 and n_never > 100 and n_near > 500


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
