"""prefill_attention / decode_attention (Triton) against their torch references.

CPU: the Triton interpreter (small shapes, ~1 ms per block op). GPU (`-m gpu`): Llama-3.1-8B
shapes and CUDA-graph replays at new positions.
"""
import pytest
import torch

from wsd_engine.kernels import decode_attention as decode_mod
from wsd_engine.kernels._common import rope_ref
from wsd_engine.kernels._common import rope_tables as rope_tables_hd
from wsd_engine.kernels.decode_attention import (decode_attention, decode_attention_ref,
                                                 split_counters)
from wsd_engine.kernels.prefill_attention import prefill_attention, prefill_attention_ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       # bf16: the interpreter rounds fp32->bf16 by truncation, so the rotated q/k can be 1 ulp
       # off the reference's; scores then move by ~1e-2 and outputs by ~1 bf16 ulp of O(1).
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def rope_tables(max_seq, hd, device="cpu"):
    return rope_tables_hd(hd, max_seq, device=device)                        # [S, hd] fp32


def make_prefill(n_q, n_kv, hd, L, prefix, max_seq, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):   # randn, never zeros; O(1) values
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(L, n_q, hd), rnd(L, n_kv, hd), rnd(L, n_kv, hd)       # [L, H, hd]
    cache = rnd(2, n_kv, max_seq, hd)           # k and v of one layer: [2, n_kv, S, hd] views
    cos, sin = rope_tables(max_seq, hd, device)
    return q, k, v, cache, cos, sin


def assert_cache_close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:   # 1 bf16 ulp (the interpreter truncates on the fp32 -> bf16 cast)
        diff = (got.float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2.0 ** -7 + 1e-30).all(), diff.max()


def run_prefill_case(n_q, n_kv, hd, L, prefix, dtype, pos_tensor, num_splits=None,
                     max_seq=None, device="cpu", fused_qkv=False):
    max_seq = max_seq or prefix + L + 9
    q, k, v, cache, cos, sin = make_prefill(n_q, n_kv, hd, L, prefix, max_seq, dtype, device)
    if fused_qkv:   # q, k, v as column slices of one [L, (n_q + 2 n_kv) hd] projection
        qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
        q = qkv[:, : n_q * hd].view(L, n_q, hd)
        k = qkv[:, n_q * hd:(n_q + n_kv) * hd].view(L, n_kv, hd)
        v = qkv[:, (n_q + n_kv) * hd:].view(L, n_kv, hd)
    ref_cache = cache.clone()
    start = torch.tensor([prefix], dtype=torch.int32, device=device) if pos_tensor else prefix
    out = prefill_attention(q, k, v, cache[0], cache[1], cos, sin, start, num_splits=num_splits)
    want = prefill_attention_ref(q, k, v, ref_cache[0], ref_cache[1], cos, sin, prefix)
    assert out.shape == (L, n_q, hd) and out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    assert_cache_close(cache, ref_cache, dtype)     # rotated k, v written; nothing else touched


# (n_q, n_kv, hd, L, prefix, dtype, start_pos as tensor, num_splits)
PREFILL_CASES = [
    (8, 2, 64, 1, 0, torch.float32, False, None),
    (8, 2, 64, 7, 5, torch.float32, True, None),
    (4, 4, 128, 7, 77, torch.float32, False, None),
    (8, 2, 64, 130, 300, torch.float32, False, None),
    (4, 4, 128, 130, 0, torch.float32, True, None),
    (4, 4, 128, 1, 77, torch.float32, False, 4),
    (8, 2, 64, 130, 77, torch.float32, True, 3),     # split path with many token tiles
    (6, 2, 64, 7, 77, torch.float32, False, 2),      # GQA group 3 (padded to 4)
    (8, 2, 128, 1, 300, torch.bfloat16, True, 3),
    (4, 4, 64, 7, 300, torch.bfloat16, False, None),
    (8, 2, 128, 130, 5, torch.bfloat16, False, None),
]


@pytest.mark.parametrize("n_q,n_kv,hd,L,prefix,dtype,pos_tensor,num_splits", PREFILL_CASES)
def test_prefill_attention(n_q, n_kv, hd, L, prefix, dtype, pos_tensor, num_splits):
    run_prefill_case(n_q, n_kv, hd, L, prefix, dtype, pos_tensor, num_splits)


def test_prefill_attention_strided_inputs_and_out():
    run_prefill_case(8, 2, 64, 7, 77, torch.float32, True, None, fused_qkv=True)
    q, k, v, cache, cos, sin = make_prefill(4, 2, 64, 5, 20, 40, torch.float32, seed=1)
    out = torch.full((5, 4, 64), float("nan"))
    got = prefill_attention(q, k, v, cache[0], cache[1], cos, sin, 20, out=out)
    assert got is out and not out.isnan().any()


def test_prefill_splits_past_the_end():
    # More pieces than key blocks: pieces past the end must contribute nothing.
    run_prefill_case(8, 2, 64, 7, 5, torch.float32, True, num_splits=16)


def test_prefill_rejects_bad_inputs():
    q, k, v, cache, cos, sin = make_prefill(8, 2, 64, 4, 10, 20, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        prefill_attention(q, k, v, cache[0], cache[1], cos, sin, 17)
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention(q[:, :7], k, v, cache[0], cache[1], cos, sin, 0)
    with pytest.raises(ValueError, match="model dtype"):
        prefill_attention(q, k.double(), v, cache[0], cache[1], cos, sin, 0)
    with pytest.raises(ValueError, match="int32/int64"):
        prefill_attention(q, k, v, cache[0], cache[1], cos, sin, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="fp32"):
        prefill_attention(q, k, v, cache[0], cache[1], cos.half(), sin, 0)


def run_decode_case(n_q, n_kv, hd, seq_len, dtype, len_tensor, num_splits, max_seq=None,
                    device="cpu", seed=0, fused_combine=False, min_piece=None):
    # the two-pass path unless a test asks for the single-launch one (the default)
    max_seq = max_seq or seq_len + 11
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n_q, hd, generator=g).to(device=device, dtype=dtype)           # [n_q, hd]
    cache = torch.randn(2, n_kv, max_seq, hd, generator=g).to(device=device, dtype=dtype)
    n = torch.tensor([seq_len], device=device) if len_tensor else seq_len
    out = decode_attention(q, cache[0], cache[1], n, num_splits=num_splits,
                           fused_combine=fused_combine, min_piece=min_piece)
    want = decode_attention_ref(q, cache[0], cache[1], seq_len)
    assert out.shape == (n_q, hd) and out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])


# (n_q, n_kv, hd, seq_len, dtype, seq_len as tensor, num_splits)
DECODE_CASES = [
    (8, 2, 64, 77, torch.float32, False, None),
    (4, 4, 128, 300, torch.float32, True, 4),
    (8, 2, 64, 1, torch.float32, False, 3),          # pieces past the end
    (8, 2, 128, 5, torch.bfloat16, True, 8),         # pieces past the end
    (4, 4, 64, 300, torch.bfloat16, False, 1),
    (6, 2, 128, 130, torch.float32, True, 5),        # GQA group 3
    (8, 2, 128, 300, torch.bfloat16, True, None),
]


# min_piece: 0 = every piece in use (pieces past the end), 16 = few keys per piece (with
# 64-key blocks some live pieces are empty), None = MIN_PIECE_DEFAULT (few, long pieces)
MIN_PIECES = [0, 16, None]


@pytest.mark.parametrize("min_piece", MIN_PIECES)
@pytest.mark.parametrize("n_q,n_kv,hd,seq_len,dtype,len_tensor,num_splits", DECODE_CASES)
def test_decode_attention(n_q, n_kv, hd, seq_len, dtype, len_tensor, num_splits, min_piece):
    run_decode_case(n_q, n_kv, hd, seq_len, dtype, len_tensor, num_splits,
                    min_piece=min_piece)


# Fused combine (one launch, last program per kv head merges). Same case layout as above.
FUSED_DECODE_CASES = [
    (8, 2, 64, 77, torch.float32, False, 2),
    (8, 2, 128, 130, torch.float32, True, 3),        # 130 = 2 blocks + 2
    (4, 4, 64, 5, torch.float32, True, 8),           # GQA 1, pieces past the end
    (4, 4, 128, 300, torch.bfloat16, False, 3),      # GQA 1
    (8, 2, 64, 1, torch.bfloat16, True, 8),          # pieces past the end
    (8, 2, 128, 200, torch.bfloat16, True, 8),
    (6, 2, 64, 130, torch.float32, False, 3),        # GQA 3 (padded to 4 in the merge)
    (8, 2, 64, 77, torch.float32, True, None),       # default piece count
]


@pytest.fixture
def no_second_launch(monkeypatch):
    """The fused path must not call the stage-2 kernel."""
    def fail(*args, **kwargs):
        raise AssertionError("fused decode launched the separate combine kernel")
    monkeypatch.setattr(decode_mod, "combine_splits", fail)


@pytest.mark.parametrize("min_piece", MIN_PIECES)
@pytest.mark.parametrize("n_q,n_kv,hd,seq_len,dtype,len_tensor,num_splits", FUSED_DECODE_CASES)
def test_decode_attention_fused(n_q, n_kv, hd, seq_len, dtype, len_tensor, num_splits,
                                min_piece, no_second_launch):
    run_decode_case(n_q, n_kv, hd, seq_len, dtype, len_tensor, num_splits, fused_combine=True,
                    min_piece=min_piece)
    assert not split_counters(torch.device("cpu"), n_kv).any()     # back to 0 for reuse


def test_decode_fused_reuses_counters(no_second_launch):
    # Three calls on the one cached counter buffer: same answer each time, counters reset.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(8, 64, generator=g)
    cache = torch.randn(2, 2, 200, 64, generator=g)
    cnt = split_counters(torch.device("cpu"), 2)
    assert cnt is split_counters("cpu", 2)                          # cached per (device, n_kv)
    n = torch.tensor([133], dtype=torch.int32)
    want = decode_attention_ref(q, cache[0], cache[1], 133)
    outs = [decode_attention(q, cache[0], cache[1], n, num_splits=3, fused_combine=True)
            for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], want, **TOL[torch.float32])
    assert not cnt.any()
    for length in (1, 64, 65, 200):     # one length tensor rewritten in place (graph-style)
        n.fill_(length)
        out = decode_attention(q, cache[0], cache[1], n, num_splits=8, fused_combine=True)
        torch.testing.assert_close(out, decode_attention_ref(q, cache[0], cache[1], length),
                                   **TOL[torch.float32])
        assert not cnt.any()


def test_decode_fused_default_and_single_split(monkeypatch, no_second_launch):
    # fused_combine=None follows FUSED_COMBINE_DEFAULT; num_splits=1 is the direct path.
    monkeypatch.setattr(decode_mod, "FUSED_COMBINE_DEFAULT", True)
    run_decode_case(8, 2, 64, 77, torch.float32, True, 3, fused_combine=None)
    run_decode_case(8, 2, 64, 77, torch.float32, False, 1, fused_combine=True)


def test_decode_same_launch_new_length():
    # The grid depends on num_splits and max_seq only: one tensor, rewritten in place (as a
    # CUDA graph replay would), gives the right answer at each length.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(8, 64, generator=g)
    cache = torch.randn(2, 2, 200, 64, generator=g)
    n = torch.tensor([1], dtype=torch.int32)
    for length in (1, 63, 64, 65, 200):
        n.fill_(length)
        out = decode_attention(q, cache[0], cache[1], n, num_splits=4)
        torch.testing.assert_close(out, decode_attention_ref(q, cache[0], cache[1], length),
                                   **TOL[torch.float32])


@pytest.fixture
def nan_workspace(monkeypatch):
    """Fresh fp32 buffers start as NaN: a merge reading a piece nobody wrote turns NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("fused", [True, False])
def test_decode_adaptive_piece_count(fused, nan_workspace):
    """One launch shape (8 pieces, length read from a tensor), lengths from 1 to the cache
    size: pieces of >= min_piece keys, the others idle; right answer at every length, the
    arrival counters back to 0 (in the fused path only the live pieces arrive)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 64, generator=g)
    cache = torch.randn(2, 2, 300, 64, generator=g)
    n = torch.tensor([1], dtype=torch.int32)
    cnt = split_counters(torch.device("cpu"), 2)
    for length in (1, 2, 40, 41, 79, 80, 81, 161, 300):
        n.fill_(length)
        for min_piece in (1, 40, 80, 1000):
            out = decode_attention(q, cache[0], cache[1], n, num_splits=8, block_n=16,
                                   fused_combine=fused, min_piece=min_piece)
            torch.testing.assert_close(out, decode_attention_ref(q, cache[0], cache[1], length),
                                       **TOL[torch.float32])
            assert not cnt.any()


def test_decode_adaptive_pieces_arrive(monkeypatch, no_second_launch):
    """Only the n_act = clamp(cdiv(keys, min_piece), 1, num_splits) live pieces write a
    partial, and the merge reads only those: the workspace starts as NaN, the idle pieces'
    rows stay NaN, the output is finite and right."""
    real_empty = torch.empty
    made = []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
            made.append(t)
        return t
    monkeypatch.setattr(torch, "empty", empty)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(4, 64, generator=g)
    cache = torch.randn(2, 1, 256, 64, generator=g)
    out = decode_attention(q, cache[0], cache[1], 200, num_splits=8, block_n=32,
                           fused_combine=True, min_piece=64)    # cdiv(200, 64) = 4 live pieces
    torch.testing.assert_close(out, decode_attention_ref(q, cache[0], cache[1], 200),
                               **TOL[torch.float32])
    lse_part = next(t for t in made if t.shape == (8, 4))          # [pieces, n_q]
    assert torch.isfinite(lse_part[:4]).all()                       # live pieces written
    assert torch.isnan(lse_part[4:]).all()                          # idle ones never touched


def test_decode_seq_len_offset():
    """A decode step passes its position tensor and seq_len_offset=1 (the kernel adds it):
    same as the length itself, for a tensor and an int, plain and append mode."""
    g = torch.Generator().manual_seed(8)
    q, kn, vn = torch.randn(8, 64, generator=g), torch.randn(2, 64, generator=g), \
        torch.randn(2, 64, generator=g)
    cache = torch.randn(2, 2, 50, 64, generator=g)
    cos, sin = rope_tables(50, 64)
    for pos in (0, 16, 49):
        want = decode_attention(q, cache[0], cache[1], pos + 1, num_splits=3)
        for p in (torch.tensor([pos]), pos):
            got = decode_attention(q, cache[0], cache[1], p, num_splits=3, seq_len_offset=1)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        c1, c2 = cache.clone(), cache.clone()
        want = decode_attention(q, c1[0], c1[1], pos + 1, k_new=kn, v_new=vn, cos=cos, sin=sin)
        got = decode_attention(q, c2[0], c2[1], torch.tensor([pos]), k_new=kn, v_new=vn,
                               cos=cos, sin=sin, seq_len_offset=1)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert torch.equal(c1, c2)
    with pytest.raises(ValueError, match="seq_len_offset"):
        decode_attention(q, cache[0], cache[1], 4, seq_len_offset=-1)
    with pytest.raises(ValueError, match="seq_len"):       # the int + offset is range-checked
        decode_attention(q, cache[0], cache[1], 50, seq_len_offset=1)


def test_decode_rejects_bad_min_piece():
    q, cache = torch.randn(8, 64), torch.randn(2, 2, 16, 64)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_piece"):
            decode_attention(q, cache[0], cache[1], 4, min_piece=bad)
        with pytest.raises(ValueError, match="prefetch_tiles"):
            decode_attention(q, cache[0], cache[1], 4, pdl=True, prefetch_tiles=bad)
    with pytest.raises(ValueError, match="pdl must be"):
        decode_attention(q, cache[0], cache[1], 4, pdl="on")
    # pdl on a CPU (no PDL there): the plain launch, same answer
    torch.testing.assert_close(decode_attention(q, cache[0], cache[1], 4, pdl=True),
                               decode_attention(q, cache[0], cache[1], 4), atol=0, rtol=0)
    assert decode_attention(q, cache[0], cache[1], 4, min_piece=0).shape == (8, 64)


# Append mode: (n_q, n_kv, hd, seq_len, dtype, len as tensor, num_splits, fused, rope)
APPEND_CASES = [
    (8, 2, 64, 77, torch.float32, False, 3, False, True),
    (8, 2, 64, 1, torch.float32, True, 4, True, True),      # empty prefix: only the new token
    (4, 4, 128, 130, torch.float32, True, 1, False, True),  # single piece
    (6, 2, 64, 65, torch.float32, True, 3, True, True),     # GQA 3; prefix = one block
    (8, 2, 128, 200, torch.bfloat16, True, 8, True, True),
    (8, 2, 64, 77, torch.float32, False, 2, True, False),   # k_new already rotated
]


@pytest.mark.parametrize("min_piece", [0, None])
@pytest.mark.parametrize("n_q,n_kv,hd,seq_len,dtype,len_tensor,num_splits,fused,rope",
                         APPEND_CASES)
def test_decode_attention_append(n_q, n_kv, hd, seq_len, dtype, len_tensor, num_splits, fused,
                                 rope, min_piece):
    """The new token (position seq_len - 1) written by the launch, q/k rotated there: equal
    to RoPE, then the cache write, then attention over [0, seq_len)."""
    g = torch.Generator().manual_seed(seq_len)
    max_seq = seq_len + 11
    q = torch.randn(n_q, hd, generator=g).to(dtype)
    kn = torch.randn(n_kv, hd, generator=g).to(dtype)
    vn = torch.randn(n_kv, hd, generator=g).to(dtype)
    cache = torch.randn(2, n_kv, max_seq, hd, generator=g).to(dtype)
    ref_cache = cache.clone()
    cos, sin = rope_tables(max_seq, hd)
    p = seq_len - 1
    if rope:
        q_rot, k_rot = rope_ref(q[None], kn[None], cos, sin, torch.tensor([p]))
        q_rot, k_rot = q_rot[0], k_rot[0]
    else:
        q_rot, k_rot = q, kn
    ref_cache[0][:, p] = k_rot
    ref_cache[1][:, p] = vn
    want = decode_attention_ref(q_rot, ref_cache[0], ref_cache[1], seq_len)
    n = torch.tensor([seq_len], dtype=torch.int64) if len_tensor else seq_len
    kw = dict(cos=cos, sin=sin) if rope else {}
    out = decode_attention(q, cache[0], cache[1], n, num_splits=num_splits, fused_combine=fused,
                           min_piece=min_piece, k_new=kn, v_new=vn, **kw)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    assert_cache_close(cache, ref_cache, dtype)     # the new row written, nothing else touched
    assert not split_counters(torch.device("cpu"), n_kv).any()


def test_decode_append_strided_views_of_qkv():
    """q, k_new, v_new as column slices of one fused projection row (the engine's layout)."""
    n_q, n_kv, hd, S = 8, 2, 64, 40
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn((n_q + 2 * n_kv) * hd, generator=g)
    q = qkv[: n_q * hd].view(n_q, hd)
    kn = qkv[n_q * hd:(n_q + n_kv) * hd].view(n_kv, hd)
    vn = qkv[(n_q + n_kv) * hd:].view(n_kv, hd)
    cache = torch.randn(2, n_kv, S, hd, generator=g)
    ref = cache.clone()
    cos, sin = rope_tables(S, hd)
    qr, kr = rope_ref(q[None], kn[None], cos, sin, torch.tensor([20]))
    ref[0][:, 20], ref[1][:, 20] = kr[0], vn
    out = decode_attention(q, cache[0], cache[1], 21, num_splits=2, k_new=kn, v_new=vn,
                           cos=cos, sin=sin)
    torch.testing.assert_close(out, decode_attention_ref(qr[0], ref[0], ref[1], 21),
                               **TOL[torch.float32])
    assert_cache_close(cache, ref, torch.float32)


def test_decode_append_rejects_bad_inputs():
    q, kn = torch.randn(8, 64), torch.randn(2, 64)
    cache = torch.randn(2, 2, 16, 64)
    cos, sin = rope_tables(16, 64)
    with pytest.raises(ValueError, match="needs both k_new and v_new"):
        decode_attention(q, cache[0], cache[1], 4, k_new=kn)
    with pytest.raises(ValueError, match="v_new must be"):
        decode_attention(q, cache[0], cache[1], 4, k_new=kn, v_new=torch.randn(2, 32))
    with pytest.raises(ValueError, match="RoPE needs both cos and sin"):
        decode_attention(q, cache[0], cache[1], 4, k_new=kn, v_new=kn, cos=cos)
    with pytest.raises(ValueError, match="cos must be"):
        decode_attention(q, cache[0], cache[1], 4, k_new=kn, v_new=kn, cos=cos[:8], sin=sin)
    with pytest.raises(ValueError, match="needs both k_new"):
        decode_attention(q, cache[0], cache[1], 4, cos=cos, sin=sin)
    out = decode_attention(q, cache[0], cache[1], 4, k_new=kn, v_new=kn, cos=cos, sin=sin)
    assert out.shape == (8, 64)                     # still usable


def test_prefill_L1_matches_decode():
    # The engine may decode through prefill_attention(L=1): same answer as rope + decode.
    q, k, v, cache, cos, sin = make_prefill(8, 2, 64, 1, 77, 90, torch.float32, seed=2)
    out = prefill_attention(q, k, v, cache[0], cache[1], cos, sin, 77)       # writes pos 77
    c, s = cos[77], sin[77]
    q_rot = q[0] * c + torch.cat((-q[0, :, 32:], q[0, :, :32]), -1) * s     # [n_q, hd]
    want = decode_attention(q_rot, cache[0], cache[1], 78, num_splits=3)
    torch.testing.assert_close(out[0], want, **TOL[torch.float32])


def test_decode_rejects_bad_inputs():
    q = torch.randn(8, 64)
    cache = torch.randn(2, 2, 16, 64)
    with pytest.raises(ValueError, match="seq_len"):
        decode_attention(q, cache[0], cache[1], 17)
    with pytest.raises(ValueError, match="seq_len"):
        decode_attention(q, cache[0], cache[1], 0)
    with pytest.raises(ValueError, match="k_cache"):
        decode_attention(q, cache[0][:, :, :32], cache[1], 4)
    with pytest.raises(ValueError, match="int32/int64"):
        decode_attention(q, cache[0], cache[1], torch.tensor([[1, 2]]))


# ---------------------------------------------------------------- GPU: Llama-3.1-8B shapes
LLAMA8B = dict(n_q=32, n_kv=8, hd=128)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [8, 64, 512])
@pytest.mark.parametrize("pos_tensor", [False, True])
def test_prefill_attention_gpu_llama8b(L, pos_tensor):
    run_prefill_case(**LLAMA8B, L=L, prefix=1000, dtype=torch.bfloat16, pos_tensor=pos_tensor,
                     max_seq=8192, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [1, 1000, 4097, 8192])
@pytest.mark.parametrize("len_tensor", [False, True])
def test_decode_attention_gpu_llama8b(seq_len, len_tensor):
    run_decode_case(**LLAMA8B, seq_len=seq_len, dtype=torch.bfloat16, len_tensor=len_tensor,
                    num_splits=None, max_seq=8192, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [1, 1000, 4097, 8192])
@pytest.mark.parametrize("len_tensor", [False, True])
@pytest.mark.parametrize("num_splits", [None, 17])
def test_decode_attention_fused_gpu_llama8b(seq_len, len_tensor, num_splits):
    run_decode_case(**LLAMA8B, seq_len=seq_len, dtype=torch.bfloat16, len_tensor=len_tensor,
                    num_splits=num_splits, max_seq=8192, device="cuda", fused_combine=True)
    assert not split_counters(torch.device("cuda"), LLAMA8B["n_kv"]).any()


@pytest.mark.gpu
def test_cuda_graph_replay_fused():
    # Several "layers" in one graph share the counter buffer; each replay must leave it at 0.
    dev, S, n_layers = "cuda", 8192, 4
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(n_layers, 2, 8, S, 128, generator=g).to(dev, torch.bfloat16)
    qd = torch.randn(32, 128, generator=g).to(dev, torch.bfloat16)
    seq = torch.ones(1, dtype=torch.int32, device=dev)
    for i in range(n_layers):                                          # warm-up / compile
        decode_attention(qd, cache[i, 0], cache[i, 1], seq, fused_combine=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [decode_attention(qd, cache[i, 0], cache[i, 1], seq, fused_combine=True)
                for i in range(n_layers)]
    for n in (1, 5, 1000, 4097, S):
        seq.fill_(n)
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        for i, out in enumerate(outs):
            want = decode_attention_ref(qd, cache[i, 0], cache[i, 1], n)
            torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16])
        assert not split_counters(torch.device(dev), 8).any()


@pytest.mark.gpu
def test_fp32_gpu_uses_exact_dot():
    run_prefill_case(8, 2, 128, 64, 300, torch.float32, True, device="cuda")
    run_decode_case(8, 2, 128, 1000, torch.float32, True, None, device="cuda")
    run_decode_case(8, 2, 128, 1000, torch.float32, True, None, device="cuda",
                    fused_combine=True)


@pytest.mark.gpu
def test_cuda_graph_replay_at_new_positions():
    dev, S = "cuda", 8192
    q, k, v, cache, cos, sin = make_prefill(**LLAMA8B, L=1, prefix=0, max_seq=S,
                                            dtype=torch.bfloat16, device=dev)
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    seq = torch.ones(1, dtype=torch.int32, device=dev)
    qd = torch.randn(32, 128, device=dev, dtype=torch.bfloat16)
    prefill_attention(q, k, v, cache[0], cache[1], cos, sin, pos)            # warm-up / compile
    decode_attention(qd, cache[0], cache[1], seq)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_p = prefill_attention(q, k, v, cache[0], cache[1], cos, sin, pos)
        out_d = decode_attention(qd, cache[0], cache[1], seq)
    for p in (5, 1000, 4097, S - 1):
        pos.fill_(p)
        seq.fill_(p + 1)
        ref_cache = cache.clone()
        graph.replay()
        want_p = prefill_attention_ref(q, k, v, ref_cache[0], ref_cache[1], cos, sin, p)
        torch.testing.assert_close(out_p.float(), want_p.float(), **TOL[torch.bfloat16])
        want_d = decode_attention_ref(qd, cache[0], cache[1], p + 1)
        torch.testing.assert_close(out_d.float(), want_d.float(), **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_decode_append_gpu_llama8b_and_graph_replay(pdl):
    """Append mode compiled at 8B shapes: eager at several lengths, then one captured launch
    replayed at new positions (the decode step's use), each against RoPE + write + ref.
    Short lengths use few pieces (min_piece); pdl: launched with programmatic dependent
    launch after the torch ops that wrote its inputs."""
    dev, S, dt = "cuda", 8192, torch.bfloat16
    g = torch.Generator().manual_seed(12)
    q = torch.randn(32, 128, generator=g).to(dev, dt)
    kn = torch.randn(8, 128, generator=g).to(dev, dt)
    vn = torch.randn(8, 128, generator=g).to(dev, dt)
    cache = torch.randn(2, 8, S, 128, generator=g).to(dev, dt)
    cos, sin = rope_tables(S, 128, dev)

    def want(n, ref_cache):
        qr, kr = rope_ref(q[None], kn[None], cos, sin, torch.tensor([n - 1], device=dev))
        ref_cache[0][:, n - 1], ref_cache[1][:, n - 1] = kr[0], vn
        return decode_attention_ref(qr[0], ref_cache[0], ref_cache[1], n)

    for n in (1, 129, 1000, 4097, S):
        for len_t in (False, True):
            ref_cache = cache.clone()
            w = want(n, ref_cache)
            nn = torch.tensor([n], device=dev) if len_t else n
            out = decode_attention(q, cache[0], cache[1], nn, k_new=kn, v_new=vn, cos=cos, sin=sin,
                                   pdl=pdl)
            torch.testing.assert_close(out.float(), w.float(), **TOL[dt])
            assert_cache_close(cache, ref_cache, dt)
    seq = torch.ones(1, dtype=torch.int64, device=dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, cache[0], cache[1], seq, k_new=kn, v_new=vn, cos=cos, sin=sin,
                               pdl=pdl)
    for n in (5, 300, 1000, 4097, S, 200):
        seq.fill_(n)
        ref_cache = cache.clone()
        w = want(n, ref_cache)
        graph.replay()
        torch.testing.assert_close(out.float(), w.float(), **TOL[dt])
        assert_cache_close(cache, ref_cache, dt)
    assert not split_counters(torch.device(dev), 8).any()
