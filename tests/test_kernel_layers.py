"""rms_norm and swiglu kernels against their torch references. (RoPE has no kernel of its
own: the attention kernels apply it, tested in test_kernel_attention.py / test_kernel_rows.py.)"""
import pytest
import torch

from wsd_engine.kernels.rms_norm import rms_norm, rms_norm_ref
from wsd_engine.kernels.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

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
    dev, dt, d, inter = "cuda", torch.bfloat16, 4096, 14336
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



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,I", [(1, 96), (5, 123)])
def test_geglu_matches_ref(dtype, T, I):
    """Gemma-2's GeGLU (gelu with the tanh approximation): large gates too, where the tanh
    saturates."""
    g = torch.Generator().manual_seed(T * I)
    gate_up = (torch.randn(T, 2 * I, generator=g) * 4.0).to(dtype)
    gate_up[0, 0], gate_up[0, 1] = 60.0, -60.0
    assert_close_dtype(geglu(gate_up), geglu_ref(gate_up))
    assert (geglu_ref(gate_up).float() - swiglu_ref(gate_up).float()).abs().max() > 0.1
