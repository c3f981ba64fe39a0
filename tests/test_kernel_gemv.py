"""gemv (batch-1 matmul with RMSNorm / SwiGLU / logits fused in) against an fp64 product of
the same activation, and against the unfused torch chain."""
import pytest
import torch

from wsd_engine.kernels.gemv import gemv, gemv_ref
from wsd_engine.kernels.rms_norm import rms_norm
from wsd_engine.kernels.swiglu import swiglu_ref

DTYPES = [torch.float32, torch.bfloat16]


def _activation(x, pre, residual, norm_weight, eps):
    """The activation the kernel forms, made by the separate kernels (same roundings). The
    swiglu one from its fp32 reference: the swiglu kernel's store is a plain cast, which
    the CPU interpreter truncates, where this kernel rounds to nearest."""
    if pre == "rmsnorm":
        if residual is not None:
            return rms_norm(x, norm_weight, eps, residual=residual)
        return rms_norm(x, norm_weight, eps), None
    if pre == "swiglu":
        return swiglu_ref(x), None
    return x, None


def _check_product(y, a, w, b, logits):
    """y equals round(W @ a + b) computed in fp64: fp32 to 1e-5 of sum |W||a|; bf16 1 ulp."""
    exact = a.double() @ w.double().T                                       # [1, N]
    if b is not None:
        exact = exact + b.double()
    scale = a.double().abs() @ w.double().abs().T
    if w.dtype == torch.float32:
        assert y.dtype == torch.float32
        assert bool(((y.double() - exact).abs() <= 1e-5 * scale + 1e-6).all())
        return
    ref = exact.to(w.dtype)                       # round-to-nearest of the exact value
    out = y.to(w.dtype) if logits else y
    assert y.dtype == (torch.float32 if logits else w.dtype)
    if logits:
        assert torch.equal(y, out.float())        # a bf16 value widened, like .float()
    # 1 ulp of ref, plus fp32 accumulation error when the sum cancels
    err = (out.double() - ref.double()).abs()
    _, e = torch.frexp(ref.double())
    ulp = torch.ldexp(torch.ones_like(ref.double()), (e - 8).clamp_min(-130))
    assert bool((err <= ulp + 1e-6 * scale).all()), float(err.max())


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(37, 72), (130, 1000)])
@pytest.mark.parametrize("pre,with_res", [("none", False), ("rmsnorm", False),
                                          ("rmsnorm", True), ("swiglu", False)])
def test_gemv_matches_fp64(dtype, N, K, pre, with_res, pdl):
    """pdl=True: the PDL program layout (first weight tile loaded before the wait, loop
    peeled); on CPU the wait itself is a no-op. Same sums in the same order: bitwise equal."""
    torch.manual_seed(N + K)
    x = torch.randn(1, 2 * K if pre == "swiglu" else K).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype) if N == 37 else None
    res = torch.randn(1, K).to(dtype) if with_res else None
    nw = (1 + 0.1 * torch.randn(K)).to(dtype) if pre == "rmsnorm" else None
    out = gemv(x, w, b, pre=pre, residual=res, norm_weight=nw, eps=1e-5,
               config={"BLOCK_N": 64, "BLOCK_K": 512}, pdl=pdl)
    y, h = out if with_res else (out, None)
    if pdl:
        plain = gemv(x, w, b, pre=pre, residual=res, norm_weight=nw, eps=1e-5,
                     config={"BLOCK_N": 64, "BLOCK_K": 512}, pdl=False)
        assert torch.equal(y, plain[0] if with_res else plain)
    a, h_want = _activation(x, pre, res, nw, 1e-5)
    if with_res:
        assert torch.equal(h, h_want)             # the new residual stream, written once
    _check_product(y, a, w, b, logits=False)
    ref = gemv_ref(x, w, b, pre=pre, residual=res, norm_weight=nw, eps=1e-5)
    ref = ref[0] if with_res else ref
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,V", [(torch.float32, 1000), (torch.bfloat16, 1000),
                                     (torch.bfloat16, 32003)])
def test_gemv_logits(dtype, V):
    """The final norm and the lm_head in one launch, fp32 out (F.linear(h, W).float())."""
    torch.manual_seed(7)
    d = 96
    x, res = torch.randn(1, d).to(dtype), torch.randn(1, d).to(dtype)
    w = (torch.randn(V, d) / d ** 0.5).to(dtype)
    nw = (1 + 0.1 * torch.randn(d)).to(dtype)
    y, h = gemv(x, w, pre="rmsnorm", residual=res, norm_weight=nw, eps=1e-5, logits=True,
                config={"BLOCK_N": 512, "BLOCK_K": 128})
    a, _ = rms_norm(x, nw, 1e-5, residual=res)
    _check_product(y, a, w, None, logits=True)
    ref, _ = gemv_ref(x, w, pre="rmsnorm", residual=res, norm_weight=nw, eps=1e-5, logits=True)
    assert ref.dtype == torch.float32
    assert (y.argmax() == ref.argmax()) or dtype != torch.float32


def test_gemv_default_config_odd_sizes():
    """The launcher's own launch shape on sizes that are not multiples of the blocks."""
    torch.manual_seed(8)
    x, w = torch.randn(1, 300), torch.randn(4099, 300) / 300 ** 0.5
    _check_product(gemv(x, w), x, w, None, logits=False)


def test_gemv_validation():
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="pre must be one of"):
        gemv(x, w, pre="gelu")
    with pytest.raises(ValueError, match=r"x must be a \[1, 32\]"):
        gemv(x, w, pre="swiglu")
    with pytest.raises(ValueError, match=r"x must be a \[1, 16\]"):
        gemv(torch.randn(2, 16), w)
    with pytest.raises(ValueError, match="weight must be"):
        gemv(x, w.T)
    with pytest.raises(ValueError, match="weight must be"):
        gemv(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bias must be"):
        gemv(x, w, torch.randn(9))
    with pytest.raises(ValueError, match="needs norm_weight"):
        gemv(x, w, pre="rmsnorm")
    with pytest.raises(ValueError, match="residual is only used"):
        gemv(x, w, residual=torch.randn(1, 16))
    with pytest.raises(ValueError, match="norm_weight is only used"):
        gemv(x, w, norm_weight=torch.randn(16))
    with pytest.raises(ValueError, match="pdl must be"):
        gemv(x, w, pdl="yes")
    with pytest.raises(ValueError, match="l2_tiles must be 0 or a power of two"):
        gemv(x, w, config={"l2_tiles": 3})
    _check_product(gemv(x, w), x, w, None, logits=False)     # still usable


@pytest.mark.gpu
@pytest.mark.parametrize("name,N,K,pre", [("qkv", 6144, 4096, "rmsnorm"),
                                          ("o", 4096, 4096, "none"),
                                          ("gate_up", 28672, 4096, "rmsnorm"),
                                          ("down", 4096, 14336, "swiglu"),
                                          ("lm_head", 128256, 4096, "rmsnorm")])
def test_gemv_llama8b_bf16_gpu(name, N, K, pre):
    torch.manual_seed(9)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, 2 * K if pre == "swiglu" else K, device=dev).to(dt)
    w = (torch.randn(N, K, device=dev) / K ** 0.5).to(dt)
    res = torch.randn(1, K, device=dev).to(dt) if pre == "rmsnorm" else None
    nw = (1 + 0.1 * torch.randn(K, device=dev)).to(dt) if pre == "rmsnorm" else None
    logits = name == "lm_head"
    out = gemv(x, w, pre=pre, residual=res, norm_weight=nw, eps=1e-5, logits=logits)
    y, h = out if res is not None else (out, None)
    a, h_want = _activation(x, pre, res, nw, 1e-5)
    if h is not None:
        assert torch.equal(h, h_want)
    _check_product(y, a, w, None, logits=logits)       # fp64 on the GPU (4 GB at the lm_head)


@pytest.mark.gpu
def test_gemv_pdl_chain_gpu():
    """A chain of dependent gemvs (each reads the previous output and the residual stream)
    launched with PDL, eagerly and replayed from a CUDA graph: bitwise equal to ordinary
    launches. A kernel reading its input before the producer finished would differ."""
    from wsd_engine.kernels.pdl import pdl_supported
    if not pdl_supported("cuda"):
        pytest.skip("PDL needs an sm_90+ GPU")
    torch.manual_seed(10)
    dev, dt, d, n = "cuda", torch.bfloat16, 4096, 12
    ws = [(torch.randn(d, d, device=dev) / d ** 0.5).to(dt) for _ in range(n)]
    nws = [(1 + 0.1 * torch.randn(d, device=dev)).to(dt) for _ in range(n)]
    x0, r0 = torch.randn(1, d, device=dev).to(dt), torch.randn(1, d, device=dev).to(dt)

    def chain(pdl):
        x, r = x0, r0
        for w, nw in zip(ws, nws):
            x, r = gemv(x, w, pre="rmsnorm", residual=r, norm_weight=nw, eps=1e-5, pdl=pdl)
        return x, r

    want = chain(False)
    got = chain(True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    chain(True)                                          # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(True)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
