"""rms_norm, rope and swiglu kernels against their torch references."""
import pytest
import torch

from wsd_engine.kernels.rms_norm import rms_norm, rms_norm_ref
from wsd_engine.kernels.rope import rope, rope_ref, rope_tables
from wsd_engine.kernels.swiglu import swiglu, swiglu_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_MANT_BITS = {torch.bfloat16: 7, torch.float16: 10}


def assert_close_dtype(out, ref, n_ulp=1):
    """fp32: ~1e-5 relative. bf16/fp16: at most n_ulp units in the last place of ref."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        return
    o, r = out.float(), ref.float()
    _, exp = torch.frexp(r)                                       # |r| = m * 2**exp, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(r), (exp - 1 - _MANT_BITS[out.dtype]).clamp_min(-24))
    err = (o - r).abs()
    assert bool((err <= n_ulp * ulp).all()), f"max error {err.max().item()} exceeds {n_ulp} ulp"


# ---------------------------------------------------------------- rms_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d", [(1, 72), (7, 1000), (130, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_ref(dtype, T, d, with_residual):
    torch.manual_seed(0)
    x = torch.randn(T, d).to(dtype)                                   # [T, d]
    w = (1 + 0.2 * torch.randn(d)).to(dtype)                          # [d]
    if with_residual:
        res = torch.randn(T, d).to(dtype)
        y, h = rms_norm(x, w, 1e-5, residual=res)
        y_ref, h_ref = rms_norm_ref(x, w, 1e-5, residual=res)
        assert_close_dtype(h, h_ref)
    else:
        y = rms_norm(x, w, 1e-5)
        y_ref = rms_norm_ref(x, w, 1e-5)
    assert_close_dtype(y, y_ref)


def test_rms_norm_strided_rows():
    torch.manual_seed(1)
    big = torch.randn(9, 200)
    x, res = big[:, 10:106], big[:, 100:196]                          # [9, 96] views
    w = torch.randn(96)
    y, h = rms_norm(x, w, 1e-6, residual=res)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, residual=res)
    assert_close_dtype(y, y_ref)
    assert_close_dtype(h, h_ref)


def test_rms_norm_validation():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(8, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.randn(8), 1e-5, residual=torch.randn(3, 9))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.randn(8), torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.randn(8, 3).T, torch.randn(8), 1e-5)


# ---------------------------------------------------------------- rope

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("T", [1, 7, 130])
def test_rope_matches_ref(dtype, head_dim, T):
    torch.manual_seed(2)
    n_q, n_kv, max_seq = 6, 2, 300
    q = torch.randn(T, n_q, head_dim).to(dtype)                       # [T, n_q, hd]
    k = torch.randn(T, n_kv, head_dim).to(dtype)                      # [T, n_kv, hd]
    cos, sin = rope_tables(head_dim, max_seq, base=500000.0)          # [max_seq, hd]
    pos = torch.randint(0, max_seq, (T,))
    q_out, k_out = rope(q, k, cos, sin, pos)
    q_ref, k_ref = rope_ref(q, k, cos, sin, pos)
    assert_close_dtype(q_out, q_ref)
    assert_close_dtype(k_out, k_ref)


def test_rope_inplace_on_fused_qkv_views():
    torch.manual_seed(3)
    T, n_q, n_kv, hd = 7, 4, 2, 64
    qkv = torch.randn(T, (n_q + 2 * n_kv) * hd)                       # fused projection output
    q = qkv[:, : n_q * hd].view(T, n_q, hd)                           # strided views
    k = qkv[:, n_q * hd:(n_q + n_kv) * hd].view(T, n_kv, hd)
    v_before = qkv[:, (n_q + n_kv) * hd:].clone()
    cos, sin = rope_tables(hd, 64)
    pos = torch.arange(10, 10 + T, dtype=torch.int32)
    q_ref, k_ref = rope_ref(q, k, cos, sin, pos)
    q_out, k_out = rope(q, k, cos, sin, pos, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert_close_dtype(q, q_ref)
    assert_close_dtype(k, k_ref)
    assert torch.equal(qkv[:, (n_q + n_kv) * hd:], v_before)          # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,T", [(64, 1), (128, 1), (64, 7)])
def test_rope_writes_the_cache(dtype, head_dim, T):
    """k rotated and v copied into the cache rows of their positions in the same launch;
    q as without the cache; every other cache row untouched."""
    torch.manual_seed(5)
    L, n_q, n_kv, S = 3, 6, 2, 40
    qkv = torch.randn(T, (n_q + 2 * n_kv) * head_dim).to(dtype)      # fused projection output
    q = qkv[:, : n_q * head_dim].view(T, n_q, head_dim)               # strided views
    k = qkv[:, n_q * head_dim:(n_q + n_kv) * head_dim].view(T, n_kv, head_dim)
    v = qkv[:, (n_q + n_kv) * head_dim:].view(T, n_kv, head_dim)
    kc = torch.randn(L, n_kv, S, head_dim).to(dtype)                  # [L, n_kv, S, hd] cache
    vc = torch.randn(L, n_kv, S, head_dim).to(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    cos, sin = rope_tables(head_dim, S, base=500000.0)
    pos = torch.randperm(S)[:T].sort().values                         # distinct positions
    q_ref, k_ref = rope_ref(q, k, cos, sin, pos)
    q_out, none = rope(q, k, cos, sin, pos, k_cache=kc[1], v=v, v_cache=vc[1])
    assert none is None
    assert_close_dtype(q_out, q_ref)
    assert_close_dtype(kc[1][:, pos].transpose(0, 1), k_ref)
    assert torch.equal(vc[1][:, pos].transpose(0, 1), v)
    other = torch.ones(S, dtype=torch.bool)
    other[pos] = False
    assert torch.equal(kc[1][:, other], kc0[1][:, other])
    assert torch.equal(vc[1][:, other], vc0[1][:, other])
    for layer in (0, 2):
        assert torch.equal(kc[layer], kc0[layer]) and torch.equal(vc[layer], vc0[layer])


def test_rope_cache_write_validation():
    q, k, v = torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    cos, sin = rope_tables(64, 16)
    pos = torch.tensor([3])
    kc, vc = torch.zeros(2, 16, 64), torch.zeros(2, 16, 64)
    with pytest.raises(ValueError, match="needs all of k_cache, v and v_cache"):
        rope(q, k, cos, sin, pos, k_cache=kc, v=v)
    with pytest.raises(ValueError, match="v_cache must be"):
        rope(q, k, cos, sin, pos, k_cache=kc, v=v, v_cache=torch.zeros(2, 8, 64))
    with pytest.raises(ValueError, match="k_cache must be"):
        rope(q, k, cos, sin, pos, k_cache=torch.zeros(3, 16, 64), v=v, v_cache=vc)
    with pytest.raises(ValueError, match="v .* must match k"):
        rope(q, k, cos, sin, pos, k_cache=kc, v=torch.randn(1, 2, 32), v_cache=vc)
    q_out, _ = rope(q, k, cos, sin, pos, k_cache=kc, v=v, v_cache=vc)   # still usable
    assert torch.equal(vc[:, 3], v[0])


def test_rope_validation():
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    cos, sin = rope_tables(64, 16)
    pos = torch.arange(3)
    with pytest.raises(ValueError, match="k "):
        rope(q, torch.randn(3, 2, 32), cos, sin, pos)
    with pytest.raises(ValueError, match="cos"):
        rope(q, k, cos.double(), sin, pos)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, cos, sin, pos.float())
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, cos, sin, pos[:2])


# ---------------------------------------------------------------- swiglu

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 1000), (7, 333), (130, 96)])
def test_swiglu_matches_ref(dtype, T, I):
    torch.manual_seed(4)
    gate_up = (3 * torch.randn(T, 2 * I)).to(dtype)                   # [T, 2I]
    assert_close_dtype(swiglu(gate_up), swiglu_ref(gate_up))


def test_swiglu_blocks_and_strided_rows():
    torch.manual_seed(5)
    big = torch.randn(5, 2 * 1000 + 24)
    gate_up = big[:, 8:8 + 2 * 1000]                                   # [5, 2000] view
    assert_close_dtype(swiglu(gate_up, block=256), swiglu_ref(gate_up))


def test_swiglu_validation():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="gate_up"):
        swiglu(torch.randn(8))


# ---------------------------------------------------------------- GPU, Llama-3.1-8B shapes

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_layers_llama8b_bf16_gpu(T):
    torch.manual_seed(6)
    dev, dt, d, inter, n_q, n_kv, hd = "cuda", torch.bfloat16, 4096, 14336, 32, 8, 128
    x = torch.randn(T, d, device=dev, dtype=dt)
    res = torch.randn(T, d, device=dev, dtype=dt)
    w = (1 + 0.1 * torch.randn(d, device=dev)).to(dt)
    y, h = rms_norm(x, w, 1e-5, residual=res)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-5, residual=res)
    assert_close_dtype(h, h_ref)
    assert_close_dtype(y, y_ref)
    assert_close_dtype(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))

    gate_up = (3 * torch.randn(T, 2 * inter, device=dev)).to(dt)
    assert_close_dtype(swiglu(gate_up), swiglu_ref(gate_up))

    q = torch.randn(T, n_q, hd, device=dev, dtype=dt)
    k = torch.randn(T, n_kv, hd, device=dev, dtype=dt)
    cos, sin = rope_tables(hd, 8192, base=500000.0, device=dev)
    pos = torch.randint(0, 8192, (T,), device=dev)
    q_out, k_out = rope(q, k, cos, sin, pos)
    q_ref, k_ref = rope_ref(q, k, cos, sin, pos)
    assert_close_dtype(q_out, q_ref)
    assert_close_dtype(k_out, k_ref)
    kc = torch.randn(n_kv, 8192, hd, device=dev, dtype=dt)          # fused cache write
    vc = torch.randn(n_kv, 8192, hd, device=dev, dtype=dt)
    v = torch.randn(T, n_kv, hd, device=dev, dtype=dt)
    p1 = pos[:1]
    q1, _ = rope(q[:1], k[:1], cos, sin, p1, k_cache=kc, v=v[:1], v_cache=vc)
    assert_close_dtype(q1, q_ref[:1])
    assert_close_dtype(kc[:, p1].transpose(0, 1), k_ref[:1])
    assert torch.equal(vc[:, p1].transpose(0, 1), v[:1])
