"""RMSNorm with an optional fused residual add, bit-compatible with Hugging Face Llama.

HF (`LlamaRMSNorm` and the decoder layer) computes, in this order:

    h   = residual + x                        # in the input dtype (one rounding)
    y   = h.float() * rsqrt(mean(h.float()**2) + eps)
    out = weight * y.to(input_dtype)          # product in the input dtype (one rounding)

The kernel does the same roundings. For bf16 it rounds to nearest-even itself (`rne_bf16` of `_common`)
instead of relying on the fp32->bf16 cast, because the Triton CPU interpreter truncates on
that cast; on a GPU the two are identical for finite values, and the extra integer ops are
free in this memory-bound kernel. Remaining differences with torch are the order of the
sum of squares and rsqrt's last bits (can move a bf16 output by 1 ulp, rarely).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import round_to

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(
    x_ptr, x_row_stride,      # [T, d]
    r_ptr, r_row_stride,      # [T, d] residual (HAS_RESIDUAL)
    w_ptr,                    # [d]
    y_ptr, y_row_stride,      # [T, d] normed output
    h_ptr, h_row_stride,      # [T, d] x + residual (HAS_RESIDUAL)
    D, D_f, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
        h = round_to(x + r, dtype)                          # HF adds in the input dtype
        tl.store(h_ptr + row * h_row_stride + offs, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.math.div_rn(tl.sum(x * x, axis=0), D_f)      # IEEE divide, like torch's mean
    y = round_to(x * tl.math.rsqrt(var + eps), dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + offs, round_to(w * y, dtype), mask=mask)


def _check_2d(name, t, like=None):
    if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES or t.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D fp32/bf16/fp16 tensor [T, d] with a contiguous "
                         f"last dim, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"{name} {t.dtype} {tuple(t.shape)} on {t.device} must match x "
                         f"{like.dtype} {tuple(like.shape)} on {like.device}")


def rms_norm(x, weight, eps, residual=None):
    """Llama RMSNorm of x [T, d] (rows may be strided) with weight [d] of x's dtype.

    Without residual returns y [T, d]; with residual [T, d] returns (y, h) where
    h = x + residual (the new residual stream) and y = rms_norm(h). Outputs are new
    contiguous tensors in x's dtype. No host sync.
    """
    _check_2d("x", x)
    if residual is not None:
        _check_2d("residual", residual, like=x)
    T, D = x.shape
    if (weight.dim() != 1 or weight.shape[0] != D or weight.dtype != x.dtype
            or weight.device != x.device or not weight.is_contiguous()):
        raise ValueError(f"weight must be a contiguous [{D}] {x.dtype} tensor on {x.device}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    y = torch.empty((T, D), device=x.device, dtype=x.dtype)
    h = torch.empty((T, D), device=x.device, dtype=x.dtype) if residual is not None else y
    if T == 0:
        return (y, h) if residual is not None else y
    r = residual if residual is not None else x
    BLOCK_D = triton.next_power_of_2(D)
    _rms_norm_kernel[(T,)](
        x, x.stride(0), r, r.stride(0), weight, y, y.stride(0), h, h.stride(0),
        D, float(D), float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_D=BLOCK_D,
        num_warps=min(16, max(1, BLOCK_D // 512)),
    )
    return (y, h) if residual is not None else y


def rms_norm_ref(x, weight, eps, residual=None):
    """Hugging Face LlamaRMSNorm (plus the decoder layer's residual add) in torch."""
    h = x if residual is None else residual + x
    h32 = h.to(torch.float32)
    y = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * y.to(x.dtype)
    return out if residual is None else (out, h)


__all__ = ["rms_norm", "rms_norm_ref"]
