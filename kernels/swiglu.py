"""Gated activations of a fused gate/up projection: SwiGLU out = silu(gate) * up (Llama,
Qwen2, Mistral) and GeGLU out = gelu_tanh(gate) * up (Gemma-2), one kernel (`ACT`).

gate_up [T, 2I] holds gate in columns [0, I) and up in [I, 2I). Math in fp32, one rounding
to the input dtype on store. Hugging Face computes `act_fn(gate) * up` in the input dtype
(two roundings for bf16); for fp32 the two are identical, for bf16 they can differ by 1 ulp.
silu(g) = g / (1 + exp(-g)) as torch computes it; gelu_tanh(g) = 0.5 g (1 + tanh(
sqrt(2/pi) (g + 0.044715 g^3))) computed as g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3)))
(the same function, without the cancellation of 1 + tanh near -1; exact limits at both
ends), within fp32 rounding of torch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _swiglu_kernel(
    gu_ptr, gu_row_stride,    # [T, 2I]
    out_ptr, out_row_stride,  # [T, I]
    I,
    BLOCK: tl.constexpr,
    ACT: tl.constexpr = 0,    # 0: silu (SwiGLU), 1: gelu with the tanh approximation (GeGLU)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * gu_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * gu_row_stride + I + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        out = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u   # IEEE divide: fp32 `/` is approximate on GPU
    else:
        # 0.5 g (1 + tanh(x)) = g sigmoid(2x): no cancellation where tanh(x) is near -1
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)    # sqrt(2/pi) (g + c g^3)
        out = tl.math.div_rn(g, 1.0 + tl.exp(-2.0 * inner)) * u
    tl.store(out_ptr + row * out_row_stride + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up, block=None):
    """silu(gate_up[:, :I]) * gate_up[:, I:] -> new contiguous [T, I] tensor in the input dtype.

    gate_up [T, 2I] fp32/bf16/fp16, rows may be strided, last dim contiguous. No host sync.
    """
    return _gated(gate_up, block, act=0)


def geglu(gate_up, block=None):
    """gelu_tanh(gate_up[:, :I]) * gate_up[:, I:] (Gemma-2's MLP), as `swiglu` otherwise."""
    return _gated(gate_up, block, act=1)


def _gated(gate_up, block, act: int):
    if gate_up.dim() != 2 or gate_up.dtype not in _FLOAT_DTYPES or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be a 2-D fp32/bf16/fp16 tensor [T, 2I] with a contiguous "
                         f"last dim, got {gate_up.dtype} {tuple(gate_up.shape)} strides "
                         f"{gate_up.stride()}")
    T, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up's last dim must be even (gate | up), got {two_i}")
    I = two_i // 2
    out = torch.empty((T, I), device=gate_up.device, dtype=gate_up.dtype)
    if T == 0 or I == 0:
        return out
    if block is None:
        # GPU: small blocks for decode so T=1 still spreads over SMs (I=14336 -> 56 programs);
        # CPU (interpreter): one block per row.
        if gate_up.is_cuda:
            block = 256 if T < 16 else 1024
        else:
            block = triton.next_power_of_2(I)
    extra = {"ACT": act} if act else {}      # silu: the kernel compiled as before
    _swiglu_kernel[(T, triton.cdiv(I, block))](
        gate_up, gate_up.stride(0), out, out.stride(0), I, BLOCK=block, num_warps=4, **extra,
    )
    return out


def swiglu_ref(gate_up):
    """silu(gate) * up in fp32, cast to the input dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def geglu_ref(gate_up):
    """gelu_tanh(gate) * up (torch's tanh approximation) computed in float64, cast to the
    input dtype: the function itself, where torch's fp32 formula loses digits (1 + tanh
    near -1, very negative gates)."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(gate_up.dtype)


__all__ = ["swiglu", "swiglu_ref", "geglu", "geglu_ref"]
