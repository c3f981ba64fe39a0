"""Helpers shared by several kernel modules (the one place they import each other's pieces from).

A kernel module imports shared Triton helpers and argument checks from here, never private
names from another kernel module, so each module can change its internals freely.

Triton (@triton.jit, called from kernels):
  rne_bf16, round_to   fp32 -> bf16 round-to-nearest-even (the interpreter truncates on casts)
  dot                  tl.dot with exact fp32 products for fp32 operands ("ieee")
  softmax_update       one online-softmax step (scores in log2 units)
  rope_rotate          rotate-half RoPE of a tile given its partner half
  soft_cap             cap * tanh(x / cap) in fp32 (Gemma-2's attention / logit soft-cap)
  attn_scores          raw q.k dots -> scaled, optionally soft-capped scores in log2 units
Host (launchers and references):
  check_ranks, check_dtype_device, check_cache_heads, check_device_scalar, check_row_vector,
  check_rope_tables
  rotate_half          the torch references' RoPE helper
  rope_ref             HF apply_rotary_pos_emb in fp32 (the RoPE reference of tests, benchmarks)
  rope_tables          plain (unscaled) HF cos/sin tables, for tests and benchmarks
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # model dtypes the kernels take


# ---- Triton helpers -----------------------------------------------------------------------
@triton.jit
def rne_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (exact under any later bf16 cast)."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    b = (b >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 x to `dtype` (returned as `dtype`), round-to-nearest-even. The Triton CPU
    interpreter truncates on the fp32 -> bf16 cast; on a GPU the two agree for finite x."""
    if dtype == tl.bfloat16:
        x = rne_bf16(x)
    return x.to(dtype)


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    # fp32 operands: exact fp32 products ("ieee", not tf32) -- the CPU interpreter path and
    # fp32 models; otherwise bf16/fp16 tensor-core operands with fp32 accumulation.
    if FP32_DOT:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def softmax_update(s, v, m_i, l_i, acc, FP32_DOT: tl.constexpr):
    """One online-softmax step. s [R, N] scores in log2 units (masked = -inf), v [N, HD]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))                               # [R]; m_i starts at -1e30
    alpha = tl.exp2(m_i - m_new)                                        # [R]
    p = tl.exp2(s - m_new[:, None])                                     # [R, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)        # [R, HD]
    return m_new, l_i, acc


@triton.jit
def rope_rotate(x, x_partner, cos, sin, offs_d, HALF: tl.constexpr):
    """x_rot = x*cos + rotate_half(x)*sin; x_partner[..., d] = x[..., (d + HALF) % HD]."""
    sign = tl.where(offs_d < HALF, -1.0, 1.0)                          # [HD]
    return x * cos + x_partner * sign[None, :] * sin


@triton.jit
def soft_cap(x, cap):
    """cap * tanh(x / cap), fp32. tanh through exp2 of -2|x/cap| (no overflow at either end;
    the interpreter and every GPU backend have exp2)."""
    a = tl.abs(x / cap)
    e = tl.exp2(a * -2.8853900817779268)                               # exp(-2a), 2*log2(e)
    t = (1.0 - e) / (1.0 + e)                                          # tanh(a) in [0, 1)
    return tl.where(x < 0, -t, t) * cap


@triton.jit
def attn_scores(dots, qk_scale, SOFTCAP: tl.constexpr):
    """Scores in log2 units from raw q.k dots. Without SOFTCAP, qk_scale = scale * log2(e)
    (one multiply, as before). With it, qk_scale = scale (natural units): the scaled score
    is capped, cap * tanh(s / cap), then converted to log2 units."""
    if SOFTCAP > 0.0:
        s = soft_cap(dots * qk_scale, SOFTCAP) * 1.4426950408889634
    else:
        s = dots * qk_scale
    return s


def attn_constexprs(softcap: float, window: int) -> dict:
    """The SOFTCAP / WINDOW constexprs to pass to an attention kernel: only those that are
    on (at their defaults they are not passed, so default calls compile today's kernels)."""
    out = {}
    if softcap:
        out["SOFTCAP"] = softcap
    if window:
        out["WINDOW"] = window
    return out


def attn_params(fn: str, hd: int, scale, softcap, window):
    """Host side of the Gemma-2 options: (qk_scale as the kernels take it, SOFTCAP constexpr,
    WINDOW constexpr). scale None: head_dim ** -0.5; softcap None / window None: off (0)."""
    default = scale is None
    if default:
        scale = hd ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{fn}: scale must be a float > 0 or None, got {scale!r}")
    if softcap is not None and (isinstance(softcap, bool)
                                or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"{fn}: softcap must be a float > 0 or None, got {softcap!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"{fn}: window must be an int >= 1 or None, got {window!r}")
    cap = float(softcap) if softcap is not None else 0.0
    if cap > 0:
        qk_scale = float(scale)
    elif default:
        qk_scale = LOG2E / math.sqrt(hd)          # bit for bit what the launchers always passed
    else:
        qk_scale = LOG2E * float(scale)
    return qk_scale, cap, int(window) if window is not None else 0


def attn_scores_ref(q, keys, scale, softcap):
    """fp32 scores q @ keys^T * scale, soft-capped when softcap is given (the references)."""
    s = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def masked_attention_ref(q, keys, vals, mask, scale, softcap):
    """fp32 attention with a bool mask: SDPA when scale / softcap are None (the references'
    plain path), else explicit scores (scaled, soft-capped), masked, fp32 softmax."""
    if scale is None and softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
    s = attn_scores_ref(q, keys, q.shape[-1] ** -0.5 if scale is None else scale, softcap)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vals


# ---- host-side checks ---------------------------------------------------------------------
def check_dtype_device(fn, ref, same_dtype: dict, fp32: dict) -> None:
    """`ref` (q) has a model dtype; every tensor is on its device; `same_dtype` share it."""
    if ref.dtype not in DTYPES:
        raise ValueError(f"{fn}: dtype {ref.dtype} not supported (use one of {DTYPES})")
    for name, t in {**same_dtype, **fp32}.items():
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, q on {ref.device}; "
                             f"move them to one device")
    for name, t in same_dtype.items():
        if t.dtype != ref.dtype:
            raise ValueError(f"{fn}: {name} is {t.dtype}, q is {ref.dtype}; "
                             f"all activations and the cache must share the model dtype")



def token_attention_ref(q, k_new, v_new, k_cache, v_cache, cos, sin, slot, pos, out=None,
                        scale=None, softcap=None, window=None):
    """Pure torch for tokens that each sit at (slot[t], pos[t]) of the cache (decode rows:
    one token per row; prefill rows: a segment's tokens): fp32 RoPE of q / k_new (cast to
    the model dtype, as the kernels round them), k / v written in place, then fp32 masked
    attention of each token over its slot's positions [0, pos[t]] (and > pos[t] - window).
    q [T, n_q, hd], k_new / v_new [T, n_kv, hd], caches [n_slots, n_kv, S, hd]; returns
    [T, n_q, hd] in q's dtype (into `out` when given)."""
    T, n_q, hd = q.shape
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    slot, pos = slot.long(), pos.long()                                 # [T]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]                   # [T, 1, hd] fp32
    q_rot = (q.float() * c + rotate_half(q.float()) * s).to(q.dtype)    # [T, n_q, hd]
    k_rot = (k_new.float() * c + rotate_half(k_new.float()) * s).to(k_cache.dtype)
    k_cache[slot, :, pos] = k_rot                                       # [T, n_kv, hd]
    v_cache[slot, :, pos] = v_new.to(v_cache.dtype)
    keys, vals = k_cache[slot].float(), v_cache[slot].float()          # [T, n_kv, S, hd]
    key_pos = torch.arange(S, device=q.device)[None, :]
    mask = key_pos <= pos[:, None]                                      # [T, S]
    if window is not None:
        mask = mask & (key_pos > pos[:, None] - window)
    # GQA as a batch dim: the group's query heads are the "sequence" of their kv head
    o = masked_attention_ref(q_rot.float().view(T, n_kv, n_q // n_kv, hd), keys, vals,
                              mask[:, None, None, :], scale, softcap)  # [T, n_kv, group, hd]
    o = o.reshape(T, n_q, hd).to(q.dtype)                               # [T, n_q, hd]
    if out is not None:
        out.copy_(o)
        return out
    return o

def check_ranks(fn: str, tensors) -> None:
    """(name, tensor, ndim) triples: right rank and a unit last-dim stride, else ValueError."""
    for name, t, nd in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{fn}: {name} must be a {nd}-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{fn}: {name} needs a unit last-dim stride "
                             f"(got strides {t.stride()}); call .contiguous()")


def check_cache_heads(fn: str, n_q: int, hd: int, k_cache, v_cache) -> tuple[int, int]:
    """The cache layout and head shapes the attention kernels need: the last three dims of
    k_cache / v_cache are [n_kv, max_seq, hd] (a single-sequence slab, or the slabs of a
    slotted [n_slots, n_kv, max_seq, hd] cache); returns (n_kv, max_seq)."""
    n_kv, max_seq = k_cache.shape[-3], k_cache.shape[-2]
    if v_cache.shape != k_cache.shape or k_cache.shape[-1] != hd:
        lead = "n_slots, " if k_cache.dim() == 4 else ""
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must both be [{lead}n_kv, max_seq, hd={hd}]")
    if n_q % n_kv != 0:
        raise ValueError(f"{fn}: n_q={n_q} is not a multiple of n_kv={n_kv}")
    if hd < 16 or hd & (hd - 1):
        raise ValueError(f"{fn}: head_dim={hd} must be a power of two >= 16")
    return n_kv, max_seq


def check_device_scalar(fn: str, name: str, t: torch.Tensor, device) -> None:
    """A position / length given as a tensor: one int32/int64 element on `device`."""
    if t.numel() != 1 or t.dtype not in (torch.int32, torch.int64) or t.device != device:
        raise ValueError(f"{fn}: a tensor {name} must be one int32/int64 element on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def check_row_vector(fn: str, name: str, t, n: int, device, dtypes=(torch.int32, torch.int64)
                     ) -> None:
    """A per-row device tensor: 1-D, n elements, contiguous, one of `dtypes`, on `device`.
    Its values are read only by the kernels (no host sync), so they are not checked here."""
    if (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n
            or t.dtype not in dtypes or t.device != device or not t.is_contiguous()):
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{fn}: {name} must be a contiguous {names} [{n}] tensor on {device}, "
                         f"got {getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}")


def check_rope_tables(fn: str, cos, sin, max_seq: int, hd: int, device) -> None:
    """cos / sin: contiguous fp32 [>= max_seq, hd] tables on `device` (the batched kernels
    index them with positions read on the device, so every cache position must have a row)."""
    for name, t in (("cos", cos), ("sin", sin)):
        if (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < max_seq
                or t.shape[1] != hd or t.dtype != torch.float32 or t.device != device
                or not t.is_contiguous()):
            raise ValueError(f"{fn}: {name} must be a contiguous fp32 [>= {max_seq}, {hd}] "
                             f"table on {device}, got {getattr(t, 'dtype', None)} "
                             f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}")


# ---- torch references ---------------------------------------------------------------------
def rotate_half(x):
    """HF rotate_half: cat(-x2, x1) over the last dim (the references' RoPE)."""
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def rope_ref(q, k, cos, sin, positions):
    """HF apply_rotary_pos_emb, in fp32, returning new tensors in the input dtype.
    q [T, n_q, hd], k [T, n_kv, hd], cos / sin [max_seq, hd] fp32 tables, positions [T]."""
    c = cos[positions.long()][:, None, :]                          # [T, 1, hd]
    s = sin[positions.long()][:, None, :]

    def rot(x):
        x32 = x.float()
        return (x32 * c + rotate_half(x32) * s).to(x.dtype)

    return rot(q), rot(k)


def rope_tables(head_dim, max_seq, base=10000.0, device=None):
    """Plain (unscaled) HF cos/sin tables [max_seq, head_dim] fp32, for tests and benchmarks."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                               / head_dim))
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


__all__ = ["LOG2E", "DTYPES", "rne_bf16", "round_to", "dot", "softmax_update", "rope_rotate",
           "soft_cap", "attn_scores", "attn_params", "attn_constexprs", "attn_scores_ref",
           "masked_attention_ref", "token_attention_ref",
           "check_dtype_device", "check_ranks", "check_cache_heads", "check_device_scalar",
           "check_row_vector", "check_rope_tables", "rotate_half", "rope_ref", "rope_tables"]
