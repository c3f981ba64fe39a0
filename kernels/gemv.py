"""Batch-1 matrix-vector products with the decode step's neighbours fused in: y = W @ a.

A decode step is a chain of ~9 kernels per layer; at batch 1 the small ones (RMSNorm,
SwiGLU, the logits cast) cost a launch and a ramp each while moving almost no data. Here
the activation `a` is formed inside the GEMV from what precedes it:

    pre="none"     a = x
    pre="rmsnorm"  a = rmsnorm(x [+ residual]) * norm_weight      (and h = x + residual stored)
    pre="swiglu"   a = silu(gate) * up,   x = [gate | up]  (the fused gate_up output)

with the same roundings as the separate kernels (`rms_norm`, `swiglu`), then
y = round(W @ a + bias) in the model dtype, or, with `logits=True`, that bf16/fp16 value
widened to fp32 (what `F.linear(h, lm_head).float()` returns).

One program computes BLOCK_N outputs: it streams its [BLOCK_N, K] rows of W (contiguous
along K) in [BLOCK_N, BLOCK_K] tiles and accumulates W * a elementwise in fp32, reducing
once at the end. With pre="rmsnorm" every program first makes one pass over x to get the
norm (the vector is a few KB, served from L2); program 0 also writes h. W is read once in
all: the kernel is a weight stream, its floor is bytes(W) / copy bandwidth.

With `pdl=True` (sm_90+, see `pdl.py`) a program loads its first weight tile before it
waits for the previous kernel (weights are never written during a step), and asks L2 for
the next L2_TILES tiles (`prefetch.global.L2`, a hint), so the weight stream starts while
the producer of `x` finishes; then it waits, releases the next kernel and runs the rest of
the loop as usual.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl as _pdl
from .pdl import pdl_wait_then_release, prefetch_l2, use_pdl
from ._common import round_to

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRE_MODES = {"none": 0, "rmsnorm": 1, "swiglu": 2}


@triton.jit
def _activation(x_ptr, r_ptr, nw_ptr, offs, m, K, rstd, dtype: tl.constexpr,
                PRE: tl.constexpr, HAS_RES: tl.constexpr):
    """The fp32 activation a[offs] the weight tile multiplies (PRE: 0 x, 1 rmsnorm, 2 swiglu),
    with the separate kernels' roundings."""
    if PRE == 2:
        g = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + offs, mask=m, other=0.0).to(tl.float32)
        a = round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u, dtype).to(tl.float32)
    else:
        a = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if PRE == 1:
            if HAS_RES:
                r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
                a = round_to(a + r, dtype).to(tl.float32)
            nw = tl.load(nw_ptr + offs, mask=m, other=0.0).to(tl.float32)
            a = round_to(a * rstd, dtype).to(tl.float32)
            a = round_to(nw * a, dtype).to(tl.float32)
    return a


@triton.jit
def _gemv_kernel(
    x_ptr,                    # [K] (pre none / rmsnorm) or [2K] gate | up (pre swiglu)
    r_ptr,                    # [K] residual (HAS_RES)
    h_ptr,                    # [K] out: x + residual (HAS_RES), written by program 0
    nw_ptr,                   # [K] norm weight (pre rmsnorm)
    w_ptr, stride_wn,         # [N, K] weight, K contiguous
    b_ptr,                    # [N] bias (HAS_BIAS)
    y_ptr,                    # [N] out
    N, K, K_f, eps,
    PRE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1,
    PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False, L2_LINES: tl.constexpr = 0,
    LINE_ELEMS: tl.constexpr = 64,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN]
    r_mask = rows < N
    dtype = x_ptr.dtype.element_ty
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn             # [BN, 1]
    k_first = 0
    if PREFETCH:   # the first weight tile before the wait: weights only (pdl.py, rule 1)
        offs0 = tl.arange(0, BLOCK_K)
        w0 = tl.load(w_rows + offs0[None, :], mask=r_mask[:, None] & (offs0 < K)[None, :],
                     other=0.0)                                         # [BN, BK]
        k_first = BLOCK_K
    if L2_LINES > 0:   # PDL only: the next tiles' 128-byte lines into L2 (rows, k clamped)
        ks = tl.minimum(BLOCK_K + tl.arange(0, L2_LINES) * LINE_ELEMS, K - 1)     # [L]
        rr = tl.minimum(rows, N - 1).to(tl.int64)
        prefetch_l2(w_ptr + rr[:, None] * stride_wn + ks[None, :])
    pdl_wait_then_release(PDL)   # nothing when PDL is off

    rstd = 0.0
    if PRE == 1:
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            m = offs < K
            a = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
                a = round_to(a + r, dtype).to(tl.float32)              # HF adds in the dtype
                tl.store(h_ptr + offs, a.to(dtype), mask=m & (pid == 0))
            ss += a * a
        var = tl.math.div_rn(tl.sum(ss, axis=0), K_f)
        rstd = tl.math.rsqrt(var + eps)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PREFETCH:   # the peeled first tile
        a = _activation(x_ptr, r_ptr, nw_ptr, offs0, offs0 < K, K, rstd, dtype, PRE, HAS_RES)
        acc += w0.to(tl.float32) * a[None, :]
    # STAGES > 1: the weight tiles of the next iterations are in flight (cp.async into
    # shared memory) while this one is multiplied; a plain loop keeps one tile in flight
    for k0 in tl.range(k_first, K, BLOCK_K, num_stages=STAGES):
        offs = k0 + tl.arange(0, BLOCK_K)                               # [BK]
        m = offs < K
        a = _activation(x_ptr, r_ptr, nw_ptr, offs, m, K, rstd, dtype, PRE, HAS_RES)
        w = tl.load(w_rows + offs[None, :], mask=r_mask[:, None] & m[None, :],
                    other=0.0).to(tl.float32)                           # [BN, BK]
        acc += w * a[None, :]
    y = tl.sum(acc, axis=1)                                             # [BN] fp32
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
    y = round_to(y, dtype)
    if LOGITS:
        tl.store(y_ptr + rows, y.to(tl.float32), mask=r_mask)
    else:
        tl.store(y_ptr + rows, y, mask=r_mask)


def default_config(N: int, K: int, interpreter: bool = False) -> dict:
    """Launch shape (not tuned on a GPU yet: `benchmarks/bench_gemv.py --sweep` measures
    the alternatives). Aims at >= 2 programs per SM on an H100 and 1 KB row segments;
    num_stages pipelines the weight loop (sm_90 compile, 8B shapes: 34-38 KB of shared
    memory at 3 stages; at 1 the loop has one 16 KB tile in flight per program).
    `interpreter` (CPU, TRITON_INTERPRET=1): wide row blocks, since the interpreter pays
    per program, not per byte (same results: each output row is computed the same way)."""
    block_n = 16 if N >= 4096 else 8
    if interpreter:
        block_n = max(block_n, min(128, triton.next_power_of_2(N)))
    block_k = min(512, triton.next_power_of_2(K))
    # l2_tiles (PDL only; 0 or a power of two): tiles after the first asked of L2 before
    # the wait; 2 = 32 KB per program, ~17 MB over a first wave of 4 programs per SM on 132
    # SMs (L2: 50 MB)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 3,
            "l2_tiles": 2}


def _check_vec(name, t, n, dtype, device):
    if (t.dim() != 2 or t.shape[0] != 1 or t.shape[1] != n or t.dtype != dtype
            or t.device != device or t.stride(1) != 1):
        raise ValueError(f"{name} must be a [1, {n}] {dtype} tensor on {device} with a contiguous "
                         f"last dim, got {t.dtype} {tuple(t.shape)} strides {t.stride()} on "
                         f"{t.device}")


def gemv(x, weight, bias=None, pre="none", residual=None, norm_weight=None, eps=1e-6,
         logits=False, config=None, pdl=False):
    """y [1, N] = weight [N, K] @ a for one token, a formed from x as `pre` says.

    x: [1, K] (pre "none" / "rmsnorm") or [1, 2K] = [gate | up] (pre "swiglu"), fp32 /
    bf16 / fp16, last dim contiguous; weight, bias [N], residual [1, K] and norm_weight [K]
    of x's dtype and device. Returns y in x's dtype (fp32 with logits=True); with pre
    "rmsnorm" and a residual returns (y, h), h = x + residual (the new residual stream).
    No host sync (CUDA-graph capturable). `config` overrides `default_config` (benchmarks).
    pdl: launch with programmatic dependent launch (`pdl.py`; None = PDL_DEFAULT; a no-op
    off sm_90+ CUDA, e.g. in the interpreter).
    """
    if pre not in PRE_MODES:
        raise ValueError(f"pre must be one of {', '.join(PRE_MODES)}, got {pre!r}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be fp32/bf16/fp16, got {x.dtype}")
    if (weight.dim() != 2 or weight.dtype != x.dtype or weight.device != x.device
            or weight.stride(1) != 1):
        raise ValueError(f"weight must be a 2-D [N, K] {x.dtype} tensor on {x.device} with a "
                         f"contiguous last dim, got {weight.dtype} {tuple(weight.shape)} strides "
                         f"{weight.stride()} on {weight.device}")
    N, K = weight.shape
    _check_vec("x", x, 2 * K if pre == "swiglu" else K, x.dtype, x.device)
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype or bias.device != x.device
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{N}] {x.dtype} tensor on {x.device}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if residual is not None:
        if pre != "rmsnorm":
            raise ValueError("residual is only used with pre='rmsnorm'")
        _check_vec("residual", residual, K, x.dtype, x.device)
    if pre == "rmsnorm":
        if (norm_weight is None or norm_weight.shape != (K,) or norm_weight.dtype != x.dtype
                or norm_weight.device != x.device or not norm_weight.is_contiguous()):
            got = None if norm_weight is None else (norm_weight.dtype, tuple(norm_weight.shape))
            raise ValueError(f"pre='rmsnorm' needs norm_weight, a contiguous [{K}] {x.dtype} "
                             f"tensor on {x.device}; got {got}")
    elif norm_weight is not None:
        raise ValueError("norm_weight is only used with pre='rmsnorm'")
    y = torch.empty((1, N), device=x.device, dtype=torch.float32 if logits else x.dtype)
    h = torch.empty((1, K), device=x.device, dtype=x.dtype) if residual is not None else None
    cfg = dict(default_config(N, K, interpreter=weight.device.type != "cuda"), **(config or {}))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    # the PDL program layout (first tile prefetched) whenever asked for, so the interpreter
    # tests it; the wait/release instructions and the launch flag only where PDL exists
    prefetch = _pdl.PDL_DEFAULT if pdl is None else pdl
    pdl = use_pdl(prefetch, x.device)            # validates: prefetch is a bool from here
    line_elems = 128 // x.element_size()               # elements per 128-byte line
    l2_tiles = cfg["l2_tiles"]
    if not isinstance(l2_tiles, int) or l2_tiles < 0 or l2_tiles & (l2_tiles - 1):
        raise ValueError(f"config l2_tiles must be 0 or a power of two, got {l2_tiles!r}")
    l2_lines = l2_tiles * max(1, cfg["BLOCK_K"] // line_elems)       # a power of two
    dummy = x
    _gemv_kernel[grid](
        x, residual if residual is not None else dummy, h if h is not None else dummy,
        norm_weight if norm_weight is not None else dummy, weight, weight.stride(0),
        bias if bias is not None else dummy, y, N, K, float(K), float(eps),
        PRE=PRE_MODES[pre], HAS_RES=residual is not None, HAS_BIAS=bias is not None,
        LOGITS=logits, PREFETCH=prefetch, PDL=pdl, launch_pdl=pdl,
        STAGES=cfg["num_stages"], L2_LINES=l2_lines if pdl else 0, LINE_ELEMS=line_elems,
        **{k: v for k, v in cfg.items() if k != "l2_tiles"})
    return (y, h) if residual is not None else y


def gemv_ref(x, weight, bias=None, pre="none", residual=None, norm_weight=None, eps=1e-6,
             logits=False):
    """The unfused torch chain (Hugging Face Llama numerics): [norm | swiglu], F.linear."""
    from .rms_norm import rms_norm_ref
    from .swiglu import swiglu_ref
    h = None
    if pre == "rmsnorm":
        if residual is not None:
            a, h = rms_norm_ref(x, norm_weight, eps, residual=residual)
        else:
            a = rms_norm_ref(x, norm_weight, eps)
    elif pre == "swiglu":
        a = swiglu_ref(x)
    else:
        a = x
    y = torch.nn.functional.linear(a, weight, bias)
    if logits:
        y = y.float()
    return (y, h) if residual is not None else y


__all__ = ["gemv", "gemv_ref", "default_config", "PRE_MODES"]
