"""Gemma-2's attention and logit options in the kernels (Triton interpreter on CPU):

  scale    q.k multiplier (query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5)
  softcap  cap * tanh(s / cap) on the scaled scores (attention) / on the logits (switch_score)
  window   sliding window: a query at position p sees keys p - window < j <= p

Each kernel against its reference, each reference against a plain per-row torch loop
(independent of the references' vectorised masks), fp32 and bf16, windows shorter and longer
than the context, and caps small enough to change the result (asserted).
"""
import pytest
import torch

from wsd_engine.kernels._common import rope_ref, rope_tables
from wsd_engine.kernels.decode_attention import (decode_attention, decode_attention_ref,
                                                 decode_attention_rows,
                                                 decode_attention_rows_ref)
from wsd_engine.kernels.prefill_attention import (prefill_attention, prefill_attention_ref,
                                                  prefill_attention_rows,
                                                  prefill_attention_rows_ref)
from wsd_engine.kernels.switch_score import (switch_score, switch_score_ref, switch_score_rows,
                                             switch_score_rows_ref)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
SCALE = 0.11          # not head_dim ** -0.5
CAP = 2.0             # small: scores of |s| ~ 1..4 are visibly bent


def plain_attention(q, keys, vals, q_pos, scale, softcap, window):
    """One query row (q [hd]) over keys [n, hd] at positions 0..n-1, fp32, a Python loop."""
    out_s = []
    for j in range(keys.shape[0]):
        if j > q_pos or (window is not None and j <= q_pos - window):
            continue
        s = float(q.double() @ keys[j].double()) * scale
        if softcap is not None:
            s = softcap * float(torch.tanh(torch.tensor(s / softcap, dtype=torch.float64)))
        out_s.append((j, s))
    m = max(s for _, s in out_s)
    w = torch.tensor([torch.exp(torch.tensor(s - m, dtype=torch.float64)) for _, s in out_s],
                     dtype=torch.float64)
    v = torch.stack([vals[j].double() for j, _ in out_s])
    return (w[:, None] * v).sum(0) / w.sum()


def attn_cases():
    # (window, softcap, scale): each option alone and together; a window of 1 (self only)
    return [(None, CAP, None), (5, None, SCALE), (40, CAP, SCALE), (1000, CAP, SCALE),
            (1, None, None)]


# ================================= decode ===================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap,scale", attn_cases())
def test_decode_attention_options(dtype, window, softcap, scale):
    g = torch.Generator().manual_seed(1)
    n_q, n_kv, hd, S, n = 4, 2, 32, 160, 150
    q = (torch.randn(n_q, hd, generator=g) * 2).to(dtype)
    kc = torch.randn(n_kv, S, hd, generator=g).to(dtype)
    vc = torch.randn(n_kv, S, hd, generator=g).to(dtype)
    kw = dict(scale=scale, softcap=softcap, window=window)
    ref = decode_attention_ref(q, kc, vc, n, **kw)
    # the reference against the per-row loop (fp32 inputs as the kernel reads them)
    for h in range(n_q):
        want = plain_attention(q[h].float(), kc[h // 2, :n].float(), vc[h // 2, :n].float(),
                               n - 1, scale or hd ** -0.5, softcap, window)
        torch.testing.assert_close(ref[h].double(), want.to(ref.dtype).double(), **TOL[dtype])
    for splits, fused, min_piece in ((1, None, None), (4, True, 16), (4, False, 0)):
        got = decode_attention(q, kc, vc, n, num_splits=splits, fused_combine=fused,
                               min_piece=min_piece, **kw)
        torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    # the options change the result (the cap is small enough to matter)
    plain = decode_attention_ref(q, kc, vc, n)
    assert (ref.float() - plain.float()).abs().max() > 0.05
    if softcap is not None:
        uncapped = decode_attention_ref(q, kc, vc, n, scale=scale, window=window)
        assert (ref.float() - uncapped.float()).abs().max() > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_append_options(dtype):
    """Append mode (the engine's step: RoPE + cache write + attention) with a tensor length,
    adaptive pieces, a window cutting through the cache and a cap."""
    g = torch.Generator().manual_seed(2)
    n_q, n_kv, hd, S = 4, 2, 32, 300
    q = (torch.randn(n_q, hd, generator=g) * 2).to(dtype)
    kn, vn = torch.randn(2, n_kv, hd, generator=g).to(dtype)
    cache = torch.randn(2, n_kv, S, hd, generator=g).to(dtype)
    cos, sin = rope_tables(hd, S)
    kw = dict(scale=SCALE, softcap=CAP, window=70)
    pos = 250
    c1 = cache.clone()
    got = decode_attention(q, c1[0], c1[1], torch.tensor([pos]), k_new=kn, v_new=vn, cos=cos,
                           sin=sin, seq_len_offset=1, num_splits=4, min_piece=32, **kw)
    qr, kr = rope_ref(q[None], kn[None], cos, sin, torch.tensor([pos]))
    c2 = cache.clone()
    c2[0][:, pos], c2[1][:, pos] = kr[0], vn
    want = decode_attention_ref(qr[0], c2[0], c2[1], pos + 1, **kw)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_rows_options(dtype):
    g = torch.Generator().manual_seed(3)
    n_q, n_kv, hd, S, n_slots, B = 4, 2, 32, 130, 4, 3
    qkv = torch.randn(B, n_q + 2 * n_kv, hd, generator=g).to(dtype)
    q, kn, vn = qkv[:, :n_q] * 2, qkv[:, n_q:n_q + n_kv], qkv[:, n_q + n_kv:]
    q = q.contiguous()
    cache = torch.randn(2, n_slots, n_kv, S, hd, generator=g).to(dtype)
    cos, sin = rope_tables(hd, S)
    slots, positions = torch.tensor([3, 0, 2]), torch.tensor([0, 12, 129])
    for window in (8, 500):
        kw = dict(scale=SCALE, softcap=CAP, window=window)
        c1, c2, c3 = cache.clone(), cache.clone(), cache.clone()
        got = decode_attention_rows(q, c1[0], c1[1], slots, positions, kn, vn, cos, sin,
                                    num_splits=2, min_piece=16, **kw)
        ref = decode_attention_rows_ref(q, c2[0], c2[1], slots, positions, kn, vn, cos, sin,
                                        **kw)
        torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
        torch.testing.assert_close(c1.float(), c2.float(), **TOL[dtype])
        # the rows reference against the single-sequence reference, row by row
        for b in range(B):
            s, p = int(slots[b]), int(positions[b])
            qr, kr = rope_ref(q[b:b + 1], kn[b:b + 1], cos, sin, positions[b:b + 1])
            c3[0][s][:, p], c3[1][s][:, p] = kr[0], vn[b]
            one = decode_attention_ref(qr[0], c3[0][s], c3[1][s], p + 1, **kw)
            torch.testing.assert_close(ref[b].float(), one.float(), **TOL[dtype])


# ================================= prefill ==================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap,scale", attn_cases())
def test_prefill_attention_options(dtype, window, softcap, scale):
    g = torch.Generator().manual_seed(4)
    n_q, n_kv, hd, S, L, start = 4, 2, 32, 128, 20, 60
    q, k, v = (torch.randn(3, L, n_q, hd, generator=g) * 1.5).to(dtype)
    k, v = k[:, :n_kv].contiguous(), v[:, :n_kv].contiguous()
    cache = torch.randn(2, n_kv, S, hd, generator=g).to(dtype)
    cos, sin = rope_tables(hd, S)
    kw = dict(scale=scale, softcap=softcap, window=window)
    c2 = cache.clone()
    ref = prefill_attention_ref(q, k, v, c2[0], c2[1], cos, sin, start, **kw)
    # reference vs the per-row loop over the cache it wrote
    qr, _ = rope_ref(q, k, cos, sin, torch.arange(start, start + L))
    for t in (0, 7, L - 1):
        for h in (0, 3):
            want = plain_attention(qr[t, h].float(), c2[0][h // 2, :start + L].float(),
                                   c2[1][h // 2, :start + L].float(), start + t,
                                   scale or hd ** -0.5, softcap, window)
            torch.testing.assert_close(ref[t, h].double(), want.to(ref.dtype).double(),
                                       **TOL[dtype])
    for splits, block_r in ((1, 16), (3, 32)):
        c1 = cache.clone()
        got = prefill_attention(q, k, v, c1[0], c1[1], cos, sin,
                                torch.tensor([start]) if splits > 1 else start,
                                num_splits=splits, block_r=block_r, block_n=16, **kw)
        torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    if softcap is not None:
        uncapped = prefill_attention_ref(q, k, v, cache.clone()[0], cache.clone()[1], cos, sin,
                                         start, scale=scale, window=window)
        assert (ref.float() - uncapped.float()).abs().max() > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_rows_options(dtype):
    g = torch.Generator().manual_seed(5)
    n_q, n_kv, hd, S, n_slots = 4, 2, 32, 96, 4
    lens, starts, slots = [5, 0, 17], [40, 3, 70], [2, 0, 3]
    T = sum(lens)
    qkv = (torch.randn(T, n_q + 2 * n_kv, hd, generator=g) * 1.5).to(dtype)
    q, k, v = qkv[:, :n_q], qkv[:, n_q:n_q + n_kv], qkv[:, n_q + n_kv:]
    cache = torch.randn(2, n_slots, n_kv, S, hd, generator=g).to(dtype)
    cos, sin = rope_tables(hd, S)
    cu = torch.tensor([0, 5, 5, 22])
    sl, st = torch.tensor(slots), torch.tensor(starts)
    for window in (6, 200):
        kw = dict(scale=SCALE, softcap=CAP, window=window)
        c1, c2, c3 = cache.clone(), cache.clone(), cache.clone()
        got = prefill_attention_rows(q, k, v, c1[0], c1[1], cos, sin, cu, sl, st, max(lens),
                                     num_splits=2, **kw)
        ref = prefill_attention_rows_ref(q, k, v, c2[0], c2[1], cos, sin, cu, sl, st, **kw)
        torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
        torch.testing.assert_close(c1.float(), c2.float(), **TOL[dtype])
        for b in range(3):   # the rows reference against the single-sequence one
            if lens[b] == 0:
                continue
            r = slice(int(cu[b]), int(cu[b + 1]))
            one = prefill_attention_ref(q[r], k[r], v[r], c3[0][slots[b]], c3[1][slots[b]],
                                        cos, sin, starts[b], **kw)
            torch.testing.assert_close(ref[r].float(), one.float(), **TOL[dtype])


def test_attention_option_checks():
    q = torch.randn(4, 32)
    kc = torch.randn(2, 16, 32)
    for bad in (dict(softcap=0.0), dict(softcap=-1.0), dict(window=0), dict(window=2.5),
                dict(scale=0.0), dict(window=True)):
        with pytest.raises(ValueError):
            decode_attention(q, kc, kc, 8, **bad)


# ================================= switch_score =============================================
def _sw_inputs(T, V, d, dtype, seed=6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * d ** -0.5 * 6).to(dtype)
    ids = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_score_softcap(dtype):
    c, V, d, w = 7, 1000, 64, 3
    hidden, weight, ids = _sw_inputs(c, V, d, dtype)
    carry = -torch.rand(w - 1)
    got = switch_score(hidden, weight, ids, carry, 2, w, -4.0, softcap=3.0, block_v=256)
    ref = switch_score_ref(hidden, weight, ids, carry, 2, w, -4.0, softcap=3.0)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logp, ref.logp, **tol)
    torch.testing.assert_close(got.lse, ref.lse, **tol)
    torch.testing.assert_close(got.mean, ref.mean, equal_nan=True, **tol)
    assert torch.equal(got.argmax, ref.argmax)
    # the reference against a plain per-row computation
    logits = hidden.double() @ weight.double().T
    capped = 3.0 * torch.tanh(logits / 3.0)
    for j in range(c):
        want = capped[j, ids[j]] - torch.logsumexp(capped[j], 0)
        assert abs(float(ref.logp[j]) - float(want)) < 1e-4
    # the cap changes the log p's
    plain = switch_score_ref(hidden, weight, ids, carry, 2, w, -4.0)
    assert (plain.logp - ref.logp).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_score_rows_softcap(dtype):
    V, d = 500, 64
    cu = torch.tensor([0, 4, 4, 9])
    T = 9
    hidden, weight, ids = _sw_inputs(T, V, d, dtype, seed=7)
    W = 3
    carry = -torch.rand(3, W - 1, dtype=torch.float64)
    n_prev, window = torch.tensor([0, 5, 2]), torch.tensor([2, 3, 3])
    log_gamma = torch.tensor([-5.0, -5.0, -3.0], dtype=torch.float64)
    got = switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window, log_gamma,
                            softcap=2.5, block_c=16)
    ref = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window, log_gamma,
                                softcap=2.5)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logp, ref.logp, **tol)
    assert torch.equal(got.argmax, ref.argmax)
    # ref vs the single-row reference per row
    for b in range(3):
        r = slice(int(cu[b]), int(cu[b + 1]))
        if r.start == r.stop:
            continue
        one = switch_score_ref(hidden[r], weight, ids[r], torch.zeros(0), 0, 1, 0.0,
                               softcap=2.5)
        torch.testing.assert_close(ref.logp[r], one.logp, **tol)
    plain = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window, log_gamma)
    assert (plain.logp - ref.logp).abs().max() > 0.1
