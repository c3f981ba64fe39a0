"""Rotary position embedding, Hugging Face "rotate_half" (non-interleaved) convention.

    out = x * cos[pos] + rotate_half(x) * sin[pos],   rotate_half(x) = cat(-x2, x1)

with x1, x2 the two halves of the head dim. Math in fp32, stored in the input dtype.
HF itself casts cos/sin to the input dtype and computes in it; for fp32 inputs that is the
same thing, for bf16 the fp32 math here is the more accurate one (differences <= ~1 bf16 ulp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rope_heads(src_ptr, src_tok_stride, src_head_stride, dst_ptr, dst_tok_stride, dst_head_stride,
                t, t_dst, n_heads, c_lo, c_hi, s_lo, s_hi, offs_d, d_mask,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate all heads of token t into row t_dst of dst; c_lo.. are [BLOCK_HALF] fp32 rows
    of the tables."""
    for h0 in range(0, n_heads, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        m = (hs < n_heads)[:, None] & d_mask[None, :]                 # [BLOCK_H, BLOCK_HALF]
        src = src_ptr + t * src_tok_stride + hs[:, None] * src_head_stride + offs_d[None, :]
        dst = dst_ptr + t_dst * dst_tok_stride + hs[:, None] * dst_head_stride + offs_d[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        o1 = x1 * c_lo[None, :] - x2 * s_lo[None, :]
        o2 = x2 * c_hi[None, :] + x1 * s_hi[None, :]
        tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, o2.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(
    q_ptr, q_tok_stride, q_head_stride,       # [T, n_q, hd]
    k_ptr, k_tok_stride, k_head_stride,       # [T, n_kv, hd]
    qo_ptr, qo_tok_stride, qo_head_stride,    # [T, n_q, hd] (may alias q)
    ko_ptr, ko_tok_stride, ko_head_stride,    # [T, n_kv, hd] (may alias k)
    cos_ptr, sin_ptr, tab_stride,             # [max_seq, hd] fp32
    pos_ptr,                                  # [T] int
    n_q, n_kv,
    v_ptr, v_tok_stride, v_head_stride,       # [T, n_kv, hd] new values (TO_CACHE)
    kc_ptr, vc_ptr, c_head_stride, c_seq_stride,   # [n_kv, max_seq, hd] caches (TO_CACHE)
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    TO_CACHE: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    row = pos * tab_stride + offs_d
    c_lo = tl.load(cos_ptr + row, mask=d_mask, other=0.0)
    c_hi = tl.load(cos_ptr + row + HALF, mask=d_mask, other=0.0)
    s_lo = tl.load(sin_ptr + row, mask=d_mask, other=0.0)
    s_hi = tl.load(sin_ptr + row + HALF, mask=d_mask, other=0.0)
    _rope_heads(q_ptr, q_tok_stride, q_head_stride, qo_ptr, qo_tok_stride, qo_head_stride,
                t, t, n_q, c_lo, c_hi, s_lo, s_hi, offs_d, d_mask, HALF, BLOCK_H)
    if TO_CACHE:
        # rotated k straight into the cache row of its position; v copied beside it
        _rope_heads(k_ptr, k_tok_stride, k_head_stride, kc_ptr, c_seq_stride, c_head_stride,
                    t, pos, n_kv, c_lo, c_hi, s_lo, s_hi, offs_d, d_mask, HALF, BLOCK_H)
        for h0 in range(0, n_kv, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            m = (hs < n_kv)[:, None] & d_mask[None, :]
            src = v_ptr + t * v_tok_stride + hs[:, None] * v_head_stride + offs_d[None, :]
            dst = vc_ptr + pos * c_seq_stride + hs[:, None] * c_head_stride + offs_d[None, :]
            tl.store(dst, tl.load(src, mask=m, other=0.0), mask=m)
            tl.store(dst + HALF, tl.load(src + HALF, mask=m, other=0.0), mask=m)
    else:
        _rope_heads(k_ptr, k_tok_stride, k_head_stride, ko_ptr, ko_tok_stride, ko_head_stride,
                    t, t, n_kv, c_lo, c_hi, s_lo, s_hi, offs_d, d_mask, HALF, BLOCK_H)


def _check_qk(name, x):
    if x.dim() != 3 or x.dtype not in _FLOAT_DTYPES or x.stride(2) != 1:
        raise ValueError(f"{name} must be a 3-D fp32/bf16/fp16 tensor [T, heads, head_dim] with a "
                         f"contiguous last dim, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")


def rope(q, k, cos, sin, positions, inplace=False, k_cache=None, v=None, v_cache=None):
    """Apply rotary embeddings to q [T, n_q, hd] and k [T, n_kv, hd] at positions [T].

    cos/sin: [max_seq, hd] fp32 tables (HF layout, cos = cat(cos(f), cos(f))); positions:
    int32/int64 on the device, each in [0, max_seq) -- not checked (that would need a host
    sync); an out-of-range position reads out of bounds. q/k may be strided views (e.g.
    slices of a fused qkv projection) as long as head_dim is contiguous.
    Out-of-place by default: returns new contiguous (q_out, k_out). With inplace=True
    writes into q and k and returns them. No host sync.

    KV cache write in the same launch: give k_cache and v_cache ([n_kv, S, hd] slabs of the
    static cache, S >= max_seq of the tables, head_dim contiguous) and the new values v
    [T, n_kv, hd]. The rotated k goes to k_cache[:, positions] and v to
    v_cache[:, positions]; returns (q_out, None) (k is then only in the cache).
    """
    _check_qk("q", q)
    _check_qk("k", k)
    T, n_q, hd = q.shape
    if k.shape[0] != T or k.shape[2] != hd or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k {k.dtype} {tuple(k.shape)} must be [{T}, n_kv, {hd}] {q.dtype} on "
                         f"{q.device} like q")
    if hd % 2:
        raise ValueError(f"head_dim must be even, got {hd}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if (tab.dim() != 2 or tab.shape[1] != hd or tab.dtype != torch.float32
                or tab.device != q.device or not tab.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 [max_seq, {hd}] tensor on {q.device}, "
                             f"got {tab.dtype} {tuple(tab.shape)} on {tab.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if (positions.dim() != 1 or positions.shape[0] != T or positions.device != q.device
            or positions.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"positions must be an int32/int64 [{T}] tensor on {q.device}, got "
                         f"{positions.dtype} {tuple(positions.shape)} on {positions.device}")
    to_cache = any(x is not None for x in (k_cache, v, v_cache))
    if to_cache:
        _check_cache_args(k, k_cache, v, v_cache, cos.shape[0])
    if inplace:
        qo, ko = q, k
    else:
        qo = torch.empty_like(q, memory_format=torch.contiguous_format)
        ko = k if to_cache else torch.empty_like(k, memory_format=torch.contiguous_format)
    if T == 0:
        return qo, (None if to_cache else ko)
    half = hd // 2
    BLOCK_HALF = triton.next_power_of_2(half)
    BLOCK_H = max(1, min(triton.next_power_of_2(max(n_q, k.shape[1])), 4096 // BLOCK_HALF))
    vv, kc, vc = (v, k_cache, v_cache) if to_cache else (k, k, k)   # unused when not to_cache
    _rope_kernel[(T,)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
        qo, qo.stride(0), qo.stride(1), ko, ko.stride(0), ko.stride(1),
        cos, sin, cos.stride(0), positions, n_q, k.shape[1],
        vv, vv.stride(0), vv.stride(1), kc, vc, kc.stride(0), kc.stride(1),
        HALF=half, BLOCK_HALF=BLOCK_HALF, BLOCK_H=BLOCK_H, TO_CACHE=to_cache, num_warps=4,
    )
    return qo, (None if to_cache else ko)


def _check_cache_args(k, k_cache, v, v_cache, max_seq):
    if k_cache is None or v is None or v_cache is None:
        raise ValueError("the cache write needs all of k_cache, v and v_cache")
    _check_qk("v", v)
    if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v {v.dtype} {tuple(v.shape)} must match k {k.dtype} {tuple(k.shape)} "
                         f"on {k.device}")
    n_kv, hd = k.shape[1], k.shape[2]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (c.dim() != 3 or c.shape[0] != n_kv or c.shape[2] != hd or c.shape[1] < max_seq
                or c.dtype != k.dtype or c.device != k.device or c.stride(2) != 1):
            raise ValueError(f"{name} must be a [{n_kv}, S >= {max_seq}, {hd}] {k.dtype} tensor on "
                             f"{k.device} with a contiguous last dim, got {c.dtype} "
                             f"{tuple(c.shape)} strides {c.stride()} on {c.device}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must have the same strides, got {k_cache.stride()} "
                         f"and {v_cache.stride()}")


def rope_ref(q, k, cos, sin, positions):
    """HF apply_rotary_pos_emb, in fp32, returning new tensors in the input dtype."""
    c = cos[positions.long()][:, None, :]                          # [T, 1, hd]
    s = sin[positions.long()][:, None, :]

    def rot(x):
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        return (x32 * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return rot(q), rot(k)


def rope_tables(head_dim, max_seq, base=10000.0, device=None):
    """Plain (unscaled) HF cos/sin tables [max_seq, head_dim] fp32, for tests and benchmarks."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                               / head_dim))
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


__all__ = ["rope", "rope_ref", "rope_tables"]
