"""Vocabulary-sharded WSD switch scoring (tensor parallelism) against the full-weight kernel
and the torch references:

  switch_score_partials             one rank's lm_head shard -> one partial per token
  switch_window_rows_from_partials  the N ranks' stacked partials -> logp / lse / argmax /
                                    mean / first, as switch_score_rows on the whole weight

The all_gather between the two is the caller's (torch.distributed); here the shards are
slices of one weight and their partials are stacked in rank order, as the gather gives them.
CPU: the Triton interpreter (small shapes, large blocks).
"""
import pytest
import torch

from wsd_engine.kernels.switch_score import (SwitchScoreRows, switch_score_partials,
                                             switch_score_partials_ref, switch_score_rows,
                                             switch_score_rows_ref, switch_window_rows,
                                             switch_window_rows_from_partials,
                                             switch_window_rows_ref)

V, D = 203, 48                      # odd vocabulary: the last shard is the short one
LENS = [4, 0, 7]                    # 11 tokens in 3 rows, one of them empty
WINDOWS, N_PREV = [3, 2, 4], [2, 0, 5]
# the ranks' kernel against the full-weight kernel: the same fp32 logits, summed over the
# vocabulary in another order; against the references: bf16 operands, exact fp32 products
TOL_KERNEL = dict(atol=1e-5, rtol=1e-5)
TOL_REF = {torch.float32: dict(atol=1e-5, rtol=1e-5),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def cu_of(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int64)


def shard_bounds(V, N):
    """Megatron-style: cdiv(V, N) rows per rank, the last rank's shard short (its padding)."""
    per = -(-V // N)
    return [min(r * per, V) for r in range(N)] + [V]


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def make_inputs(lens, dtype, N, seed=0, W=None):
    """Random hidden / weight, draft ids spread over every shard with each shard's first and
    last row (its boundaries) among them, and a random carry."""
    g = torch.Generator().manual_seed(seed)
    T, B = sum(lens), len(lens)
    W = W or max(WINDOWS)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * D ** -0.5 * 4).to(dtype)
    ids = torch.randint(0, V, (T,), generator=g)
    bounds = shard_bounds(V, N)
    edges = sorted({x for r in range(N) for x in (bounds[r], bounds[r + 1] - 1)})
    perm = torch.randperm(T, generator=g)
    for k, e in enumerate(edges[:T]):
        ids[perm[k]] = e
    carry = -torch.rand(B, W - 1, generator=g) * 3
    return hidden, weight, ids, carry, bounds


def thresholds(mean, lens):
    """Per row: half-way between two of its distinct defined means (no near-ties), or -1."""
    lg, t = torch.full((len(lens),), -1.0), 0
    for b, n in enumerate(lens):
        vals = torch.unique(mean[t:t + n][~mean[t:t + n].isnan()].float())
        if len(vals) >= 2:
            i = len(vals) // 2
            lg[b] = (vals[i - 1] + vals[i]) / 2
        t += n
    return lg


def tp_rows(hidden, weight, ids, bounds, cu, carry, n_prev, window, lg, softcap=None,
            block_c=None, **kw):
    """What N ranks compute: each its shard's partials, gathered in rank order, combined."""
    parts, idxs = [], []
    for r in range(len(bounds) - 1):
        p, i = switch_score_partials(hidden, weight[bounds[r]:bounds[r + 1]], ids, bounds[r],
                                     softcap=softcap, block_c=block_c, **kw)
        assert p.shape == (4, hidden.shape[0]) and p.dtype == torch.float32
        assert i.shape == (hidden.shape[0],) and i.dtype == torch.int32
        parts.append(p)
        idxs.append(i)
    return switch_window_rows_from_partials(torch.stack(parts, 1), torch.stack(idxs), cu, carry,
                                            n_prev, window, lg, block_c=block_c)


def rows_args(lens=LENS, windows=WINDOWS, n_prev=N_PREV):
    return cu_of(lens), torch.tensor(n_prev), torch.tensor(windows)


# (N, dtype, softcap, lens, kw): kw go to switch_score_partials (and block_c to the combine)
TP_CASES = [
    (1, torch.float32, None, LENS, {}),
    (2, torch.float32, None, LENS, {}),
    (3, torch.float32, None, LENS, {}),
    (4, torch.float32, None, LENS, {}),
    (3, torch.float32, 30.0, LENS, {}),
    (4, torch.float32, None, [4, 0, 15], dict(block_c=16, block_v=16, tiles_per_prog=1)),
    (2, torch.bfloat16, None, LENS, {}),
    (3, torch.bfloat16, 30.0, LENS, dict(block_v=32, tiles_per_prog=1)),
]


@pytest.mark.parametrize("N,dtype,softcap,lens,kw", TP_CASES)
def test_tp_equals_full_weight(N, dtype, softcap, lens, kw):
    hidden, weight, ids, carry, bounds = make_inputs(lens, dtype, N, seed=N)
    cu, n_prev, window = rows_args(lens)
    probe = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window,
                                  torch.zeros(len(lens)), softcap=softcap)
    lg = thresholds(probe.mean, lens)
    full = switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window, lg,
                             softcap=softcap)
    ref = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window, lg,
                                softcap=softcap)
    out = tp_rows(hidden, weight, ids, bounds, cu, carry, n_prev, window, lg, softcap, **kw)
    assert isinstance(out, SwitchScoreRows)
    torch.testing.assert_close(out.logp, full.logp, **TOL_KERNEL)
    torch.testing.assert_close(out.lse, full.lse, **TOL_KERNEL)
    torch.testing.assert_close(out.mean, full.mean, **TOL_KERNEL, equal_nan=True)
    assert out.argmax.dtype == torch.int64 and torch.equal(out.argmax, full.argmax)
    assert out.first.dtype == torch.int64 and out.first.tolist() == full.first.tolist()
    if N == 1 and not kw:   # one shard: the same programs, the same merges -> the same bits
        assert torch.equal(out.logp, full.logp) and torch.equal(out.lse, full.lse)
    torch.testing.assert_close(out.logp, ref.logp, **TOL_REF[dtype])
    torch.testing.assert_close(out.lse, ref.lse, **TOL_REF[dtype])
    torch.testing.assert_close(out.mean, ref.mean, **TOL_REF[dtype], equal_nan=True)
    assert torch.equal(out.argmax, ref.argmax)
    assert out.first.tolist() == ref.first.tolist()          # thresholds far from every mean
    assert any(f >= 0 for f in out.first.tolist())           # the rule fires somewhere
    # the decision is exact on the combined log p's (the window half of the rows kernel)
    mean, first = switch_window_rows_ref(out.logp, cu, carry, n_prev, window, lg)
    assert same_bits(out.mean, mean) and out.first.tolist() == first.tolist()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_match_ref(dtype, softcap):
    hidden, weight, ids, _, bounds = make_inputs(LENS, dtype, 3, seed=21)
    ids[0], ids[1] = -4, V + 50                  # ids of no shard at all: draft logit 0
    ids = ids.to(torch.int32)
    for r in range(3):
        shard = weight[bounds[r]:bounds[r + 1]]
        part, idx = switch_score_partials(hidden, shard, ids, bounds[r], softcap=softcap,
                                          block_v=16, tiles_per_prog=2)
        want_part, want_idx = switch_score_partials_ref(hidden, shard, ids, bounds[r],
                                                        softcap=softcap)
        assert want_part.dtype == torch.float32 and want_idx.dtype == torch.int32
        torch.testing.assert_close(part, want_part, atol=1e-5, rtol=1e-5)
        assert torch.equal(idx, want_idx)
        assert ((idx >= bounds[r]) & (idx < bounds[r + 1])).all()
        inside = (ids >= bounds[r]) & (ids < bounds[r + 1])
        assert inside.any() and (part[3][~inside] == 0).all() and (part[3][inside] != 0).all()
        assert torch.equal(part[0], part[2])         # the max is the best logit
        if softcap is not None:
            assert (part[0].abs() < softcap).all()


def test_argmax_ties_across_shards_lowest_global_index():
    """Exact small-integer logits (any summation order gives the same fp32 value): the best
    row is duplicated in two shards (and once more inside the first of them), so every
    token's maximum ties; the argmax must be the lowest global index, as on the full weight."""
    g = torch.Generator().manual_seed(5)
    T = sum(LENS)
    hidden = torch.randint(1, 3, (T, D), generator=g).float()          # > 0
    weight = torch.randint(-2, 3, (V, D), generator=g).float()         # |w| <= 2
    cu, n_prev, window = rows_args()
    carry = -torch.rand(len(LENS), max(WINDOWS) - 1, generator=g) * 3
    lg = torch.full((len(LENS),), -3.0)
    for N in (2, 3, 4):
        bounds = shard_bounds(V, N)
        k1 = bounds[N - 2] + 5                   # the lowest copy (N > 2: not in shard 0)
        dups = [bounds[N - 1] + 20, k1 + 7, k1]  # the last shard, then k1's own shard
        assert len({next(r for r in range(N) if k < bounds[r + 1]) for k in dups}) == 2
        w = weight.clone()
        w[dups] = 3.0                            # 3 * sum(h) beats any other row
        ids = torch.randint(0, V, (T,), generator=g)
        full = switch_score_rows(hidden, w, ids, cu, carry, n_prev, window, lg)
        out = tp_rows(hidden, w, ids, bounds, cu, carry, n_prev, window, lg)
        assert (out.argmax == k1).all() and torch.equal(out.argmax, full.argmax)
        ref = switch_score_rows_ref(hidden, w, ids, cu, carry, n_prev, window, lg)
        assert torch.equal(out.argmax, ref.argmax)
        torch.testing.assert_close(out.logp, full.logp, **TOL_KERNEL)
        for r in range(N):                       # each shard's own tie: its lowest index
            p, i = switch_score_partials(hidden, w[bounds[r]:bounds[r + 1]], ids, bounds[r],
                                         block_v=16, tiles_per_prog=1)
            _, want = switch_score_partials_ref(hidden, w[bounds[r]:bounds[r + 1]], ids,
                                                bounds[r])
            assert torch.equal(i, want)
    # the two copies on either side of a shard boundary: the earlier shard's row wins
    bounds = shard_bounds(V, 2)
    w = weight.clone()
    w[[bounds[1] - 1, bounds[1]]] = 3.0          # the two rows on the shard boundary
    out = tp_rows(hidden, w, torch.zeros(T, dtype=torch.int64), bounds, cu, carry, n_prev,
                  window, lg)
    assert (out.argmax == bounds[1] - 1).all()


def test_fp64_rule_first_equals_full_weight_kernel():
    N = 3
    hidden, weight, ids, carry, bounds = make_inputs(LENS, torch.float32, N, seed=13)
    cu, n_prev, window = rows_args()
    probe = switch_score_rows_ref(hidden, weight, ids, cu, carry, n_prev, window,
                                  torch.zeros(len(LENS)))
    lg = thresholds(probe.mean, LENS).double()
    carry = carry.double()
    full = switch_score_rows(hidden, weight, ids, cu, carry, n_prev, window, lg)
    out = tp_rows(hidden, weight, ids, bounds, cu, carry, n_prev, window, lg)
    assert out.first.tolist() == full.first.tolist() and any(f >= 0 for f in out.first.tolist())
    torch.testing.assert_close(out.logp, full.logp, **TOL_KERNEL)
    # the float64 rule on the combined log p's is the window kernel's, bit for bit
    again = switch_window_rows(out.logp, cu, carry, n_prev, window, lg)
    assert same_bits(out.mean, again.mean) and out.first.tolist() == again.first.tolist()


def test_ids_outside_a_one_row_shard_read_nothing_else():
    """A one-row shard inside a weight whose other rows are NaN: no id (other shards', out of
    the vocabulary, negative) may reach them; the draft logit is 0, the argmax the row."""
    g = torch.Generator().manual_seed(17)
    T = sum(LENS)
    hidden = torch.randn(T, D, generator=g)
    big = torch.full((40, D), float("nan"))
    big[20] = torch.randn(D, generator=g)
    shard = big[20:21]                           # a view: NaN rows on both sides in memory
    ids = torch.tensor([0, 19, 21, 39, -1, -100, 1000, 2 ** 31 - 1, 5, 22, 30])
    part, idx = switch_score_partials(hidden, shard, ids, 20, block_v=16)
    logit = hidden @ shard[0]
    assert not part.isnan().any()
    torch.testing.assert_close(part[0], logit, atol=1e-5, rtol=1e-5)
    assert torch.equal(part[1], torch.ones(T)) and torch.equal(part[0], part[2])
    assert torch.equal(part[3], torch.zeros(T))
    assert torch.equal(idx, torch.full((T,), 20, dtype=torch.int32))
    ids[3] = 20                                  # now one token's id is the shard's row
    part, _ = switch_score_partials(hidden, shard, ids, 20, block_v=16)
    assert part[3][3] == part[0][3] and (part[3][torch.arange(T) != 3] == 0).all()


def test_from_partials_out_and_bad_inputs():
    N = 2
    hidden, weight, ids, carry, bounds = make_inputs(LENS, torch.float32, N, seed=3)
    cu, n_prev, window = rows_args()
    lg = torch.full((3,), -3.0)
    T = sum(LENS)
    ps = [switch_score_partials(hidden, weight[bounds[r]:bounds[r + 1]], ids, bounds[r])
          for r in range(N)]
    parts = torch.stack([p for p, _ in ps], 1)
    idxs = torch.stack([i for _, i in ps])
    out = SwitchScoreRows(logp=torch.empty(T), lse=torch.empty(T),
                          argmax=torch.empty(T, dtype=torch.int64), mean=torch.empty(T),
                          first=torch.empty(3, dtype=torch.int64))
    got = switch_window_rows_from_partials(parts, idxs, cu, carry, n_prev, window, lg, out=out)
    assert got is out and not out.logp.isnan().any()
    args = (cu, carry, n_prev, window, lg)
    with pytest.raises(ValueError, match=r"parts must be .*\[4, N, T\]"):
        switch_window_rows_from_partials(parts[:3], idxs, *args)
    with pytest.raises(ValueError, match="parts must be"):
        switch_window_rows_from_partials(parts[0], idxs, *args)          # [N, T]
    with pytest.raises(ValueError, match="parts must be .*fp32"):
        switch_window_rows_from_partials(parts.double(), idxs, *args)
    with pytest.raises(ValueError, match="parts must be .*contiguous"):
        switch_window_rows_from_partials(parts.transpose(1, 2).contiguous().transpose(1, 2),
                                         idxs, *args)
    with pytest.raises(ValueError, match=r"idxs must be .*\[2, 11\]"):
        switch_window_rows_from_partials(parts, idxs[:1], *args)
    with pytest.raises(ValueError, match=r"idxs must be .*\[2, 11\]"):
        switch_window_rows_from_partials(parts, idxs[:, :5], *args)
    with pytest.raises(ValueError, match="idxs must be .*int32"):
        switch_window_rows_from_partials(parts, idxs.long(), *args)
    with pytest.raises(ValueError, match="carry"):
        switch_window_rows_from_partials(parts, idxs, cu, carry[:1], n_prev, window, lg)
    with pytest.raises(ValueError, match="log_gamma"):
        switch_window_rows_from_partials(parts, idxs, cu, carry, n_prev, window, lg.double())
    with pytest.raises(ValueError, match="vocab_offset"):
        switch_score_partials(hidden, weight[:10], ids, -1)
    with pytest.raises(ValueError, match="vocab_offset"):
        switch_score_partials(hidden, weight[:10], ids, True)
    with pytest.raises(ValueError, match="no rows"):
        switch_score_partials(hidden, weight[:0], ids, 0)
    with pytest.raises(ValueError, match="draft_ids"):
        switch_score_partials(hidden, weight[:10], ids[:5], 0)
