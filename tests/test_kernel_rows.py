"""The batched (per-row) kernels against their torch references, and the references against
a per-row loop over the single-sequence references:

  decode_attention_rows   one new token per row, each row in its own cache slot
  prefill_attention_rows  varlen segments of new tokens, each appended to its own slot
  switch_score_rows       one lm_head pass for all rows' tokens, each row's own window rule

The cache is slotted, [n_slots, n_kv, max_seq, hd]; rows sit in non-contiguous slots.
CPU: the Triton interpreter (small shapes, large blocks). GPU (`-m gpu`): 8B-like shapes and
CUDA-graph replays with new positions / lengths written into the device tensors.
"""
import math

import pytest
import torch

from wsd_engine.kernels._common import rope_ref, rope_tables
from wsd_engine.kernels.decode_attention import (decode_attention, decode_attention_ref,
                                                 decode_attention_rows,
                                                 decode_attention_rows_ref, split_counters)
from wsd_engine.kernels.prefill_attention import (prefill_attention, prefill_attention_ref,
                                                  prefill_attention_rows,
                                                  prefill_attention_rows_ref)
from wsd_engine.kernels.switch_score import (SwitchScoreRows, switch_score, switch_score_ref,
                                             switch_score_rows, switch_score_rows_ref,
                                             switch_window_ref, switch_window_rows,
                                             switch_window_rows_ref)

# As tests/test_kernel_attention.py: bf16 rotated q / k may be 1 ulp off the reference's
# (the interpreter truncates on fp32 -> bf16 casts), moving outputs by ~1 bf16 ulp of O(1).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def assert_cache_close(got, want, dtype):
    """fp32: equal to rounding; bf16: within 1 ulp (interpreter casts truncate)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2.0 ** -7 + 1e-30).all(), diff.max()


def fused_qkv(T, n_q, n_kv, hd, dtype, g, device="cpu"):
    """q, k, v as strided views of one [T, (n_q + 2 n_kv), hd] projection (the engine's)."""
    qkv = torch.randn(T, n_q + 2 * n_kv, hd, generator=g).to(device=device, dtype=dtype)
    return qkv[:, :n_q], qkv[:, n_q:n_q + n_kv], qkv[:, n_q + n_kv:]


def cu_of(lens, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int64,
                        device=device)


# ============================ decode_attention_rows =========================================
def make_decode_rows(n_q, n_kv, hd, S, n_slots, B, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, kn, vn = fused_qkv(B, n_q, n_kv, hd, dtype, g, device)          # [B, H, hd] views
    cache = torch.randn(2, n_slots, n_kv, S, hd, generator=g).to(device=device, dtype=dtype)
    cos, sin = rope_tables(hd, S, device=device)
    return q, kn, vn, cache, cos, sin


def decode_rows_by_single_refs(q, kn, vn, kc, vc, cos, sin, slots, positions):
    """Independent: per row, rope_ref + the cache write + decode_attention_ref on its slab."""
    outs = []
    for b in range(q.shape[0]):
        s, p = int(slots[b]), int(positions[b])
        qr, kr = rope_ref(q[b:b + 1], kn[b:b + 1], cos, sin, positions[b:b + 1])
        kc[s][:, p] = kr[0]
        vc[s][:, p] = vn[b]
        outs.append(decode_attention_ref(qr[0], kc[s], vc[s], p + 1))
    return torch.stack(outs)


def test_decode_rows_ref_matches_single_refs():
    q, kn, vn, cache, cos, sin = make_decode_rows(6, 2, 64, 150, 5, 3, torch.float32)
    slots, positions = torch.tensor([3, 0, 2]), torch.tensor([0, 41, 149])
    c1, c2 = cache.clone(), cache.clone()
    got = decode_attention_rows_ref(q, c1[0], c1[1], slots, positions, kn, vn, cos, sin)
    want = decode_rows_by_single_refs(q, kn, vn, c2[0], c2[1], cos, sin, slots, positions)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(c1, c2)


# (n_q, n_kv, hd, dtype, fused_combine, num_splits, min_piece)
DECODE_ROWS_CASES = [
    (6, 2, 64, torch.float32, None, None, None),    # GQA 3, defaults (fused, adaptive pieces)
    (6, 2, 64, torch.float32, False, 3, 0),         # two-pass, every piece in use
    (4, 4, 128, torch.float32, True, 4, 16),        # GQA 1, short pieces
    (6, 2, 64, torch.bfloat16, True, 4, 0),
    (8, 2, 64, torch.bfloat16, False, 1, None),     # one piece: no workspace
]


@pytest.mark.parametrize("n_q,n_kv,hd,dtype,fused,num_splits,min_piece", DECODE_ROWS_CASES)
def test_decode_attention_rows(n_q, n_kv, hd, dtype, fused, num_splits, min_piece):
    S, n_slots = 150, 5
    slots = torch.tensor([3, 0, 2])                 # non-contiguous, not in order
    positions = torch.tensor([0, 77, 149])          # empty prefix .. the last cache row
    q, kn, vn, cache, cos, sin = make_decode_rows(n_q, n_kv, hd, S, n_slots, 3, dtype)
    ref_cache = cache.clone()
    out = decode_attention_rows(q, cache[0], cache[1], slots, positions, kn, vn, cos, sin,
                                fused_combine=fused, num_splits=num_splits,
                                min_piece=min_piece)
    want = decode_attention_rows_ref(q, ref_cache[0], ref_cache[1], slots, positions, kn, vn,
                                     cos, sin)
    assert out.shape == (3, n_q, hd) and out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    assert_cache_close(cache, ref_cache, dtype)     # (slot, pos) rows written, nothing else
    assert not split_counters(torch.device("cpu"), 3 * n_kv).any()


def test_decode_rows_equal_single_sequence_kernel():
    # The rows path is the single-sequence program moved to row b: same bits, row by row.
    S, dtype = 150, torch.bfloat16
    q, kn, vn, cache, cos, sin = make_decode_rows(6, 2, 64, S, 4, 2, dtype, seed=3)
    slots, positions = torch.tensor([2, 1]), torch.tensor([130, 9])
    single = cache.clone()
    out = decode_attention_rows(q, cache[0], cache[1], slots, positions, kn, vn, cos, sin,
                                num_splits=3, min_piece=16, max_len=131)
    for b in range(2):
        s, p = int(slots[b]), int(positions[b])
        one = decode_attention(q[b], single[0, s], single[1, s], p + 1, k_new=kn[b],
                               v_new=vn[b], cos=cos, sin=sin, num_splits=3, min_piece=16)
        assert torch.equal(out[b], one)
    assert torch.equal(cache, single)


def test_decode_rows_out_and_max_len():
    q, kn, vn, cache, cos, sin = make_decode_rows(4, 2, 64, 40, 3, 2, torch.float32, seed=1)
    slots, positions = torch.tensor([1, 2]), torch.tensor([7, 20])
    ref_cache = cache.clone()
    out = torch.full((2, 4, 64), float("nan"))
    got = decode_attention_rows(q, cache[0], cache[1], slots, positions, kn, vn, cos, sin,
                                out=out, max_len=21)
    want = decode_attention_rows_ref(q, ref_cache[0], ref_cache[1], slots, positions, kn, vn,
                                     cos, sin)
    assert got is out
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_decode_rows_rejects_bad_inputs():
    q, kn, vn, cache, cos, sin = make_decode_rows(4, 2, 64, 40, 3, 2, torch.float32)
    kc, vc = cache[0], cache[1]
    sl, pos = torch.tensor([0, 1]), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="4-D"):
        decode_attention_rows(q, kc[0], vc[0], sl, pos, kn, vn, cos, sin)
    with pytest.raises(ValueError, match="slots"):
        decode_attention_rows(q, kc, vc, sl.float(), pos, kn, vn, cos, sin)
    with pytest.raises(ValueError, match="positions"):
        decode_attention_rows(q, kc, vc, sl, pos[:1], kn, vn, cos, sin)
    with pytest.raises(ValueError, match="k_new"):
        decode_attention_rows(q, kc, vc, sl, pos, kn[:1], vn, cos, sin)
    with pytest.raises(ValueError, match="cos"):
        decode_attention_rows(q, kc, vc, sl, pos, kn, vn, cos[:10], sin)
    with pytest.raises(ValueError, match="cache slots"):
        decode_attention_rows(q, kc[:1], vc[:1], sl, pos, kn, vn, cos, sin)
    with pytest.raises(ValueError, match="model dtype"):
        decode_attention_rows(q, kc, vc, sl, pos, kn.double(), vn, cos, sin)


# ============================ prefill_attention_rows ========================================
def make_prefill_rows(n_q, n_kv, hd, lens, S, n_slots, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = fused_qkv(sum(lens), n_q, n_kv, hd, dtype, g, device)
    cache = torch.randn(2, n_slots, n_kv, S, hd, generator=g).to(device=device, dtype=dtype)
    cos, sin = rope_tables(hd, S, device=device)
    return q, k, v, cache, cos, sin


def prefill_rows_by_single_refs(q, k, v, kc, vc, cos, sin, lens, slots, starts):
    """Independent: prefill_attention_ref on each segment's slab (in place), concatenated."""
    outs, t = [], 0
    for n, s, p in zip(lens, slots, starts):
        if n:
            outs.append(prefill_attention_ref(q[t:t + n], k[t:t + n], v[t:t + n], kc[s], vc[s],
                                              cos, sin, p))
        t += n
    return torch.cat(outs)


def test_prefill_rows_ref_matches_single_refs():
    lens, slots, starts = [1, 37, 0, 5], [3, 0, 4, 2], [77, 10, 3, 0]
    q, k, v, cache, cos, sin = make_prefill_rows(6, 2, 64, lens, 150, 5, torch.float32)
    c1, c2 = cache.clone(), cache.clone()
    got = prefill_attention_rows_ref(q, k, v, c1[0], c1[1], cos, sin, cu_of(lens),
                                     torch.tensor(slots), torch.tensor(starts), max(lens))
    want = prefill_rows_by_single_refs(q, k, v, c2[0], c2[1], cos, sin, lens, slots, starts)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(c1, c2)


# (n_q, n_kv, hd, dtype, segment lengths, slots, starts, num_splits)
PREFILL_ROWS_CASES = [
    # a decode row (length 1) mixed with chunks, an empty segment, slots [3, 0, 4, 2] of 5
    (6, 2, 64, torch.float32, [1, 37, 0, 5], [3, 0, 4, 2], [77, 10, 3, 0], None),
    (6, 2, 64, torch.float32, [1, 37, 0, 5], [3, 0, 4, 2], [77, 10, 3, 0], 3),   # split keys
    (4, 4, 128, torch.float32, [100, 1, 3], [1, 4, 0], [0, 140, 41], None),
    (6, 2, 64, torch.bfloat16, [9, 1, 23], [2, 0, 3], [33, 148, 100], None),
    (8, 2, 64, torch.bfloat16, [100, 1], [4, 1], [49, 0], 2),
]


@pytest.mark.parametrize("n_q,n_kv,hd,dtype,lens,slots,starts,num_splits", PREFILL_ROWS_CASES)
def test_prefill_attention_rows(n_q, n_kv, hd, dtype, lens, slots, starts, num_splits):
    S, n_slots = 150, 5
    q, k, v, cache, cos, sin = make_prefill_rows(n_q, n_kv, hd, lens, S, n_slots, dtype)
    ref_cache = cache.clone()
    args = (cu_of(lens), torch.tensor(slots), torch.tensor(starts), max(lens))
    out = prefill_attention_rows(q, k, v, cache[0], cache[1], cos, sin, *args,
                                 num_splits=num_splits)
    want = prefill_attention_rows_ref(q, k, v, ref_cache[0], ref_cache[1], cos, sin, *args)
    assert out.shape == (sum(lens), n_q, hd) and out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    assert_cache_close(cache, ref_cache, dtype)


def test_prefill_rows_equal_single_sequence_kernel():
    # Each segment gives the bits prefill_attention gives it alone (same tile sizes).
    lens, slots, starts = [20, 1, 7], [2, 0, 1], [5, 60, 0]
    q, k, v, cache, cos, sin = make_prefill_rows(6, 2, 64, lens, 80, 3, torch.bfloat16, seed=2)
    single = cache.clone()
    out = prefill_attention_rows(q, k, v, cache[0], cache[1], cos, sin, cu_of(lens),
                                 torch.tensor(slots), torch.tensor(starts), 20, block_r=32)
    t = 0
    for n, s, p in zip(lens, slots, starts):
        one = prefill_attention(q[t:t + n], k[t:t + n], v[t:t + n], single[0, s], single[1, s],
                                cos, sin, p, block_r=32)
        assert torch.equal(out[t:t + n], one)
        t += n
    assert torch.equal(cache, single)


def test_prefill_rows_out_param():
    lens = [3, 4]
    q, k, v, cache, cos, sin = make_prefill_rows(4, 2, 64, lens, 40, 2, torch.float32, seed=1)
    out = torch.full((7, 4, 64), float("nan"))
    got = prefill_attention_rows(q, k, v, cache[0], cache[1], cos, sin, cu_of(lens),
                                 torch.tensor([1, 0]), torch.tensor([6, 30]), 4, out=out)
    assert got is out and not out.isnan().any()


def test_prefill_rows_rejects_bad_inputs():
    lens = [3, 4]
    q, k, v, cache, cos, sin = make_prefill_rows(4, 2, 64, lens, 40, 2, torch.float32)
    kc, vc, cu = cache[0], cache[1], cu_of(lens)
    sl, st = torch.tensor([1, 0]), torch.tensor([6, 30])
    with pytest.raises(ValueError, match="max_q"):
        prefill_attention_rows(q, k, v, kc, vc, cos, sin, cu, sl, st, 0)
    with pytest.raises(ValueError, match="max_q"):
        prefill_attention_rows(q, k, v, kc, vc, cos, sin, cu, sl, st, 8)
    with pytest.raises(ValueError, match="seg_slots"):
        prefill_attention_rows(q, k, v, kc, vc, cos, sin, cu, sl[:1], st, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention_rows(q, k, v, kc, vc, cos, sin, cu.float(), sl, st, 4)
    with pytest.raises(ValueError, match="4-D"):
        prefill_attention_rows(q, k, v, kc[0], vc[0], cos, sin, cu, sl, st, 4)
    with pytest.raises(ValueError, match=r"\[T, n_kv, hd\]"):
        prefill_attention_rows(q, k[:6], v, kc, vc, cos, sin, cu, sl, st, 4)


# ============================ switch_score_rows =============================================
def same_bits(a, b):
    """Equal element for element, NaN where the other is NaN (the window rule is exact)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def window_rows_by_single_refs(logp, lens, carry, n_prev, window, log_gamma):
    """Independent: switch_window_ref per row on its segment and carry[b, W - w_b:]."""
    W = carry.shape[1] + 1
    means, firsts, t = [], [], 0
    for b, n in enumerate(lens):
        w = int(window[b])
        if n:
            m, f = switch_window_ref(logp[t:t + n], carry[b, W - w:], int(n_prev[b]), w,
                                     float(log_gamma[b]))
            means.append(m)
            firsts.append(int(f))
        else:
            firsts.append(-1)
        t += n
    return torch.cat(means), torch.tensor(firsts, dtype=torch.int64)


def crafted_window_rows():
    """Five rows, W = 6, carry right-aligned; unused carry cells hold NaN (must be ignored).

    row 0: w 4, carried log p's high: its first token already passes -> first 0
    row 1: w 6, 20 tokens (two 16-token blocks), threshold just above its best mean -> -1
    row 2: no tokens this step -> -1
    row 3: w 1, log_gamma exactly log p[5] (>=, not >) -> first 5
    row 4: w 3, n_prev 1 (window undefined at j = 0), log_gamma exactly its mean at j = 6
    """
    g = torch.Generator().manual_seed(7)
    lens = [4, 20, 0, 7, 9]
    window = torch.tensor([4, 6, 2, 1, 3])
    n_prev = torch.tensor([10, 0, 3, 0, 1])
    W = 6
    carry = torch.full((5, W - 1), float("nan"))
    carry[0, 2:] = -0.1                                  # its last 3
    carry[1, :] = -torch.rand(5, generator=g)            # n_prev 0: never read
    carry[2, 4:] = -0.5
    carry[4, 3:] = torch.tensor([float("nan"), -0.7])    # the older one: no such token
    row_logp = [torch.tensor([-0.3, -5.0, -5.0, -5.0]),
                -torch.rand(20, generator=g) * 3,
                torch.zeros(0),
                torch.tensor([-4.0, -4.0, -4.0, -4.0, -4.0, -1.0, -2.0]),
                -torch.rand(9, generator=g) * 2]
    logp = torch.cat(row_logp).float()
    log_gamma = torch.tensor([-0.5, 0.0, -1.0, -1.0, 0.0], dtype=torch.float32)
    # row 1: just above its best mean; row 4: exactly its mean at j = 6
    m1, _ = switch_window_ref(row_logp[1], carry[1], 0, 6, 0.0)
    log_gamma[1] = torch.nextafter(m1[~m1.isnan()].max(), torch.tensor(math.inf))
    m4, _ = switch_window_ref(row_logp[4], carry[4, 3:], 1, 3, 0.0)
    log_gamma[4] = m4[6]
    expect_first = [0, -1, -1, 5, int(torch.nonzero(m4[1:] >= m4[6])[0, 0]) + 1]
    return lens, logp, carry, n_prev, window, log_gamma, expect_first


def test_switch_window_rows_ref_matches_single_refs():
    lens, logp, carry, n_prev, window, lg, expect = crafted_window_rows()
    mean, first = switch_window_rows_ref(logp, cu_of(lens), carry, n_prev, window, lg)
    want_mean, want_first = window_rows_by_single_refs(logp, lens, carry, n_prev, window, lg)
    assert same_bits(mean, want_mean)
    assert first.tolist() == want_first.tolist() == expect


@pytest.mark.parametrize("block_c", [16, None])    # 16: row 1 spans two blocks
def test_switch_window_rows_exact(block_c):
    lens, logp, carry, n_prev, window, lg, expect = crafted_window_rows()
    out = switch_window_rows(logp, cu_of(lens), carry, n_prev, window, lg, block_c=block_c)
    mean, first = switch_window_rows_ref(logp, cu_of(lens), carry, n_prev, window, lg)
    assert isinstance(out, SwitchScoreRows)
    assert torch.equal(out.logp, logp)
    assert same_bits(out.mean, mean)
    assert out.first.dtype == torch.int64 and out.first.tolist() == first.tolist() == expect


def test_switch_window_rows_on_threshold_ties():
    # Many log p's equal to the threshold's neighbours: the fp32 window sums sit on it; kernel
    # and reference must take the same side every time (same operations, same order).
    g = torch.Generator().manual_seed(11)
    lens = [13, 8, 30, 1]
    vals = torch.tensor([-0.1, -0.2, -0.3, -0.7], dtype=torch.float32)
    logp = vals[torch.randint(0, 4, (sum(lens),), generator=g)]
    window = torch.tensor([3, 5, 7, 2])
    n_prev = torch.tensor([2, 0, 9, 4])
    carry = vals[torch.randint(0, 4, (4, 6), generator=g)]
    mean0, _ = switch_window_rows_ref(logp, cu_of(lens), carry, n_prev, window,
                                      torch.zeros(4))
    # each row's threshold = one of its own defined means (exactly)
    lg, t = torch.zeros(4), 0
    for b, n in enumerate(lens):
        m = mean0[t:t + n]
        m = m[~m.isnan()]
        lg[b] = m[len(m) // 2] if len(m) else 0.0
        t += n
    out = switch_window_rows(logp, cu_of(lens), carry, n_prev, window, lg, block_c=16)
    mean, first = switch_window_rows_ref(logp, cu_of(lens), carry, n_prev, window, lg)
    want_mean, want_first = window_rows_by_single_refs(logp, lens, carry, n_prev, window, lg)
    assert same_bits(out.mean, mean) and same_bits(mean, want_mean)
    assert out.first.tolist() == first.tolist() == want_first.tolist()


def _score_inputs(lens, V, d, dtype, W, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T, B = sum(lens), len(lens)
    hidden = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)            # [T, d]
    weight = (torch.randn(V, d, generator=g) * d ** -0.5 * 4).to(device=device, dtype=dtype)
    ids = torch.randint(0, V, (T,), generator=g).to(device)                          # [T]
    carry = (-torch.rand(B, W - 1, generator=g) * 3).to(device)                      # [B, W-1]
    return hidden, weight, ids, carry


def _thresholds(mean, lens):
    """Per row: half-way between two of its distinct defined means (no near-ties), or -1."""
    lg, t = torch.full((len(lens),), -1.0), 0
    for b, n in enumerate(lens):
        vals = torch.unique(mean[t:t + n][~mean[t:t + n].isnan()].float().cpu())
        if len(vals) >= 2:
            i = len(vals) // 2
            lg[b] = (vals[i - 1] + vals[i]) / 2
        t += n
    return lg


# (lens, V, d, dtype, windows, n_prev, kw)
SCORE_ROWS_CASES = [
    ([3, 1, 0, 9, 5], 1000, 72, torch.float32, [4, 1, 2, 6, 3], [5, 0, 2, 1, 0], {}),
    ([3, 1, 0, 9, 5], 1000, 72, torch.float32, [4, 1, 2, 6, 3], [5, 0, 2, 1, 0],
     dict(block_c=16, block_v=128, tiles_per_prog=2, block_p=2)),   # 2 token tiles, 4 partials
    ([20, 1, 7], 3001, 96, torch.bfloat16, [8, 3, 1], [0, 40, 3], dict(block_c=16)),
    ([8, 8, 8, 8], 1000, 72, torch.float16, [2, 3, 4, 5], [9, 0, 1, 30], {}),
]


@pytest.mark.parametrize("lens,V,d,dtype,windows,n_prev,kw", SCORE_ROWS_CASES)
def test_switch_score_rows(lens, V, d, dtype, windows, n_prev, kw):
    W = max(windows)
    hidden, weight, ids, carry = _score_inputs(lens, V, d, dtype, W)
    cu, window, n_prev = cu_of(lens), torch.tensor(windows), torch.tensor(n_prev)
    probe = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window,
                                  torch.zeros(len(lens)))
    lg = _thresholds(probe.mean, lens)
    ref = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window, lg)
    out = switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window, lg, **kw)
    assert isinstance(out, SwitchScoreRows)
    torch.testing.assert_close(out.logp, ref.logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lse, ref.lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax, ref.argmax)
    torch.testing.assert_close(out.mean, ref.mean, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert out.first.dtype == torch.int64 and out.first.shape == (len(lens),)
    assert out.first.tolist() == ref.first.tolist()      # thresholds far from every mean
    # the decision itself is exact: the window reference on the kernel's own log p's
    mean, first = switch_window_rows_ref(out.logp, cu, carry, n_prev, window, lg)
    assert same_bits(out.mean, mean) and out.first.tolist() == first.tolist()


def test_switch_score_rows_ref_matches_single_refs():
    lens, windows, n_prev = [3, 1, 0, 9, 5], [4, 1, 2, 6, 3], [5, 0, 2, 1, 0]
    W = max(windows)
    hidden, weight, ids, carry = _score_inputs(lens, 500, 40, torch.float32, W, seed=4)
    lg = torch.tensor([-2.0, -3.0, -1.0, -2.5, -4.0])
    ref = switch_score_rows_ref(hidden, weight, ids, cu_of(lens), carry, torch.tensor(n_prev),
                                torch.tensor(windows), lg)
    t = 0
    for b, n in enumerate(lens):
        if n:
            w = windows[b]
            one = switch_score_ref(hidden[t:t + n], weight, ids[t:t + n], carry[b, W - w:],
                                   n_prev[b], w, float(lg[b]))
            torch.testing.assert_close(ref.logp[t:t + n], one.logp, atol=1e-6, rtol=1e-6)
            assert torch.equal(ref.argmax[t:t + n], one.argmax)
            assert same_bits(ref.mean[t:t + n], one.mean) or torch.allclose(
                ref.mean[t:t + n], one.mean, atol=1e-6, equal_nan=True)
            assert int(ref.first[b]) == int(one.first)
        else:
            assert int(ref.first[b]) == -1
        t += n


def test_switch_score_rows_matches_single_kernel_per_row():
    # Row by row, the batched pass gives what switch_score gives each row's chunk alone.
    lens, windows, n_prev = [5, 2, 8], [3, 1, 4], [4, 0, 2]
    W = max(windows)
    hidden, weight, ids, carry = _score_inputs(lens, 1000, 72, torch.float32, W, seed=9)
    lg = torch.tensor([-3.0, -2.0, -4.0])
    out = switch_score_rows(hidden, weight, ids, cu_of(lens), carry, torch.tensor(n_prev),
                            torch.tensor(windows), lg)
    t = 0
    for b, n in enumerate(lens):
        w = windows[b]
        one = switch_score(hidden[t:t + n], weight, ids[t:t + n], carry[b, W - w:].contiguous(),
                           n_prev[b], w, float(lg[b]))
        torch.testing.assert_close(out.logp[t:t + n], one.logp, atol=1e-6, rtol=1e-6)
        assert torch.equal(out.argmax[t:t + n], one.argmax)
        assert int(out.first[b]) == int(one.first)
        t += n


def test_switch_score_rows_out_and_bad_inputs():
    lens = [3, 4]
    hidden, weight, ids, carry = _score_inputs(lens, 300, 40, torch.float32, 3)
    cu, n_prev, window = cu_of(lens), torch.tensor([0, 5]), torch.tensor([3, 2])
    lg = torch.tensor([-1.0, -2.0])
    out = SwitchScoreRows(logp=torch.empty(7), lse=torch.empty(7),
                          argmax=torch.empty(7, dtype=torch.int64), mean=torch.empty(7),
                          first=torch.empty(2, dtype=torch.int64))
    got = switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window, lg, out=out)
    assert got is out and not out.logp.isnan().any()
    with pytest.raises(ValueError, match="carry"):
        switch_score_rows(hidden, weight, ids, cu, carry[:1], n_prev, window, lg)
    with pytest.raises(ValueError, match="log_gamma"):
        switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window, lg.double())
    with pytest.raises(ValueError, match="window"):
        switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window.float(), lg)
    with pytest.raises(ValueError, match="n_prev"):
        switch_score_rows(hidden, weight, ids, cu, carry, n_prev[:1], window, lg)
    with pytest.raises(ValueError, match="cu_seqlens"):
        switch_score_rows(hidden, weight, ids, cu[:1], carry, n_prev, window, lg)
    with pytest.raises(ValueError, match="draft_ids"):
        switch_score_rows(hidden, weight, ids[:5], cu, carry, n_prev, window, lg)


# ============================ GPU: 8B-like shapes, CUDA graphs ==============================
@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_decode_rows_gpu_graph_replay(pdl):
    """Llama-3.1-8B heads, 4 rows in slots [5, 0, 3, 6] of 8: eager, then one captured launch
    replayed with new positions written into the device tensor."""
    dev, dt, S = "cuda", torch.bfloat16, 4096
    q, kn, vn, cache, cos, sin = make_decode_rows(32, 8, 128, S, 8, 4, dt, seed=5, device=dev)
    slots = torch.tensor([5, 0, 3, 6], device=dev)
    positions = torch.tensor([0, 129, 4095, 1000], device=dev)

    def check(out):
        ref_cache = cache.clone()
        want = decode_attention_rows_ref(q, ref_cache[0], ref_cache[1], slots, positions, kn,
                                         vn, cos, sin)
        return want, ref_cache

    want, ref_cache = check(None)
    out = decode_attention_rows(q, cache[0], cache[1], slots, positions, kn, vn, cos, sin,
                                pdl=pdl)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dt])
    assert_cache_close(cache, ref_cache, dt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_rows(q, cache[0], cache[1], slots, positions, kn, vn, cos, sin,
                                    pdl=pdl)
    for pos in ([7, 3000, 1, 64], [4095, 0, 2048, 300]):
        positions.copy_(torch.tensor(pos))
        want, ref_cache = check(None)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), want.float(), **TOL[dt])
        assert_cache_close(cache, ref_cache, dt)
    assert not split_counters(torch.device(dev), 4 * 8).any()


@pytest.mark.gpu
def test_prefill_rows_gpu_graph_replay():
    dev, dt, S = "cuda", torch.bfloat16, 2048
    lens = [1, 100, 8, 37]
    q, k, v, cache, cos, sin = make_prefill_rows(32, 8, 128, lens, S, 6, dt, seed=6,
                                                 device=dev)
    cu = cu_of(lens, dev)
    slots = torch.tensor([4, 1, 0, 5], device=dev)
    starts = torch.tensor([700, 0, 33, 1500], device=dev)

    def want():
        ref_cache = cache.clone()
        return prefill_attention_rows_ref(q, k, v, ref_cache[0], ref_cache[1], cos, sin, cu,
                                          slots, starts), ref_cache

    w, ref_cache = want()
    out = prefill_attention_rows(q, k, v, cache[0], cache[1], cos, sin, cu, slots, starts, 100)
    torch.testing.assert_close(out.float(), w.float(), **TOL[dt])
    assert_cache_close(cache, ref_cache, dt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = prefill_attention_rows(q, k, v, cache[0], cache[1], cos, sin, cu, slots, starts,
                                     100)
    starts.copy_(torch.tensor([5, 1900, 0, 64]))
    w, ref_cache = want()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), w.float(), **TOL[dt])
    assert_cache_close(cache, ref_cache, dt)


@pytest.mark.gpu
def test_switch_score_rows_gpu():
    dev = "cuda"
    lens, windows, n_prev = [8, 8, 1, 0, 40, 8], [4, 8, 2, 3, 6, 1], [3, 0, 9, 1, 20, 0]
    W = max(windows)
    hidden, weight, ids, carry = _score_inputs(lens, 32003, 512, torch.bfloat16, W, seed=3,
                                               device=dev)
    cu, window = cu_of(lens, dev), torch.tensor(windows, device=dev)
    n_prev_t = torch.tensor(n_prev, device=dev)
    probe = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev_t, window,
                                  torch.zeros(len(lens), device=dev))
    lg = _thresholds(probe.mean.cpu(), lens).to(dev)
    ref = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev_t, window, lg)
    out = switch_score_rows(hidden, weight, ids, cu, carry, n_prev_t, window, lg)
    torch.testing.assert_close(out.logp, ref.logp, atol=2e-3, rtol=1e-3)
    mean, first = switch_window_rows_ref(out.logp, cu, carry, n_prev_t, window, lg)
    assert same_bits(out.mean.cpu(), mean.cpu()) and out.first.tolist() == first.tolist()


def test_switch_window_rows_fp64_equals_the_engine_rule():
    """With fp64 carry and log_gamma the kernel's decision is the float64 rule the engine
    applies (`switch.first_pass_rows`, itself equal to `SwitchState.update`), including
    thresholds placed exactly on a window mean."""
    import math
    import random

    from wsd_engine.switch import SwitchState, first_pass_rows
    from wsd_engine.kernels.switch_score import switch_window_rows
    rng = random.Random(5)
    for trial in range(40):
        B = rng.randint(1, 5)
        states, counts, chunks = [], [], []
        for b in range(B):
            st = SwitchState.from_threshold(rng.randint(1, 7), rng.choice([0.3, 0.6, 0.9]))
            st.record([math.log(rng.uniform(0.2, 1.0)) for _ in range(rng.randint(0, 9))])
            n = rng.randint(1, 12)
            chunk = torch.tensor([math.log(rng.uniform(0.2, 1.0)) for _ in range(n)],
                                 dtype=torch.float32)
            if trial % 3 == 0 and st.n_scored + n >= st.window:   # a threshold on a mean
                ext = torch.tensor(st.logps, dtype=torch.float64).tolist() + \
                    chunk.double().tolist()
                w = st.window
                acc = ext[-w]
                for x in ext[-w + 1:]:
                    acc = acc + x
                st.log_gamma = acc / w
            states.append(st)
            counts.append(n)
            chunks.append(chunk)
        W = max(s.window for s in states)
        carry = torch.zeros(B, max(W - 1, 0), dtype=torch.float64)
        for b, s in enumerate(states):
            c = s.carried
            if c:
                carry[b, W - 1 - len(c):] = torch.tensor(c, dtype=torch.float64)
        logp = torch.cat(chunks)
        cu = torch.tensor([0] + counts).cumsum(0)
        n_prev = torch.tensor([s.n_scored for s in states])
        window = torch.tensor([s.window for s in states])
        lg = torch.tensor([s.log_gamma for s in states], dtype=torch.float64)
        got = switch_window_rows(logp, cu, carry, n_prev, window, lg).first
        oracle = first_pass_rows(logp, counts, carry, n_prev, window, lg)
        host = []
        for b, s in enumerate(states):
            n0 = s.n_scored
            k = s.update(chunks[b])
            host.append(-1 if k is None else k - n0 - 1)
        assert got.tolist() == oracle.tolist() == host, trial
