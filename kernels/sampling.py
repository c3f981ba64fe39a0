"""Token sampling in one kernel: greedy, or temperature + top-k + top-p, seeded, no host sync.

Rules (shared with `sample_ref`):
  * temperature == 0: argmax of the logits, lowest index on ties.
  * z = logits / temperature (fp32, correctly rounded).
  * top_k > 0: keep tokens with z >= the k-th largest z (ties at the k-th value all kept).
  * p = softmax(z) over the kept tokens.
  * top_p < 1: keep a token iff the total p of tokens with a strictly larger z is < top_p
    (the most probable token is always kept).
  * draw by the exponential race: argmax over kept tokens of p_i / E_i, E_i ~ Exp(1).
    The kernel takes E_i = -log(U_i), U_i = tl.rand(seed, offset * V + i) (Philox), and
    maximises the equivalent z_i - log(E_i) (log of p_i / E_i minus a row constant).
    Same (seed, offset) -> same token; a batch row b uses offset + b.

Thresholds without a sort: each is found by bisection on the int32 key that orders fp32
values like the floats (negative floats get their magnitude bits flipped). 32 halvings of
the 2^32 key range give the exact k-th largest z (top-k: largest key t with
count(key >= t) >= k) and the exact top-p cut (smallest t with mass(key > t) < top_p),
one pass over the vocab per halving. The top-p mass is an fp32 sum, so a token whose
mass-above is within float rounding of top_p can be decided differently from the
reference; anything else is exact.

Cost (not measured on a GPU yet): one program per row; greedy is one pass over V, top-k or
top-p add 32 passes each (served from L2 at V=128256). Expect tens of microseconds per
sampled token with top-k/top-p, a few with plain temperature or greedy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _load_z(x_ptr, row_off, r_mask, v0, V, temperature, BLOCK_V: tl.constexpr):
    """Tile of z = logits / temperature [BLOCK_R, BLOCK_V], -inf outside; its int key."""
    vs = v0 + tl.arange(0, BLOCK_V)
    valid = r_mask[:, None] & (vs < V)[None, :]
    x = tl.load(x_ptr + row_off[:, None] + vs[None, :], mask=valid, other=float("-inf"))
    t = tl.zeros([BLOCK_V], tl.float32) + temperature
    z = tl.math.div_rn(x.to(tl.float32), t[None, :]) + 0.0   # + 0.0: -0.0 -> +0.0
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # same order as z
    return z, key, valid, vs


@triton.jit
def _sample_kernel(
    x_ptr, x_row_stride,      # [B, V] logits
    out_ptr,                  # [B] int64
    B, V, temperature, top_k, top_p,
    seed, offset,             # ints, or pointers to 1-element int tensors
    GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    SEED_IS_PTR: tl.constexpr, OFFSET_IS_PTR: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < B
    row_off = rows.to(tl.int64) * x_row_stride
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_R], tl.int32)
    if GREEDY:
        for v0 in range(0, V, BLOCK_V):
            vs = v0 + tl.arange(0, BLOCK_V)
            valid = r_mask[:, None] & (vs < V)[None, :]
            x = tl.load(x_ptr + row_off[:, None] + vs[None, :], mask=valid,
                        other=float("-inf")).to(tl.float32)
            tm = tl.max(x, axis=1)
            better = tm > best                                   # strict: lowest index wins
            best_i = tl.where(better, v0 + tl.argmax(x, axis=1), best_i)
            best = tl.where(better, tm, best)
    else:
        kth = tl.full([BLOCK_R], -2147483648, tl.int64)          # keep key >= kth
        if TOP_K:
            lo = tl.full([BLOCK_R], -2147483648, tl.int64)       # count(key >= lo) >= k
            hi = tl.full([BLOCK_R], 2147483648, tl.int64)        # count(key >= hi) < k
            for _ in range(32):
                mid = (lo + hi) >> 1
                cnt = tl.zeros([BLOCK_R], tl.int32)
                for v0 in range(0, V, BLOCK_V):
                    z, key, valid, vs = _load_z(x_ptr, row_off, r_mask, v0, V, temperature, BLOCK_V)
                    cnt += tl.sum((valid & (key >= mid[:, None])).to(tl.int32), axis=1)
                ok = cnt >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            kth = lo

        # log-sum-exp of z over the top-k set
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            z, key, valid, vs = _load_z(x_ptr, row_off, r_mask, v0, V, temperature, BLOCK_V)
            zk = tl.where(valid & (key >= kth[:, None]), z, float("-inf"))
            new_m = tl.maximum(m, tl.max(zk, axis=1))
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - safe_m))
            s = s * alpha + tl.sum(tl.exp(zk - safe_m[:, None]), axis=1)
            m = new_m
        # s >= 1 on real rows (the max term is exp(0)); padded rows (s = 0) get lse = 0
        lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.maximum(s, 1.0))

        pth = tl.full([BLOCK_R], -2147483648, tl.int64)          # keep key >= pth
        if TOP_P:
            lo = tl.full([BLOCK_R], -2147483649, tl.int64)       # mass(key > lo) >= top_p
            hi = tl.full([BLOCK_R], 2147483647, tl.int64)        # mass(key > hi) < top_p
            for _ in range(32):
                mid = (lo + hi) >> 1
                mass = tl.zeros([BLOCK_R], tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    z, key, valid, vs = _load_z(x_ptr, row_off, r_mask, v0, V, temperature, BLOCK_V)
                    above = valid & (key >= kth[:, None]) & (key > mid[:, None])
                    mass += tl.sum(tl.where(above, tl.exp(z - lse[:, None]), 0.0), axis=1)
                ok = mass < top_p
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid)
            pth = hi

        # exponential race
        if SEED_IS_PTR:
            seed_v = tl.load(seed).to(tl.int64)
        else:
            seed_v = seed
        if OFFSET_IS_PTR:
            off_v = tl.load(offset).to(tl.int64)
        else:
            off_v = offset
        row_stream = (off_v + rows.to(tl.int64)) * V                # [BLOCK_R] int64
        for v0 in range(0, V, BLOCK_V):
            z, key, valid, vs = _load_z(x_ptr, row_off, r_mask, v0, V, temperature, BLOCK_V)
            keep = valid & (key >= kth[:, None]) & (key >= pth[:, None])
            u = tl.rand(seed_v, row_stream[:, None] + vs[None, :])
            # U is in [0, 1] in fp32 (Triton's uint->float can round up to 1.0): clamp so
            # E is finite and > 0 and every kept token scores above -inf and below +inf.
            e = tl.maximum(-tl.log(tl.maximum(u, 1e-30)), 1e-30)
            score = tl.where(keep, z - tl.log(e), float("-inf"))
            tm = tl.max(score, axis=1)
            better = tm > best
            best_i = tl.where(better, v0 + tl.argmax(score, axis=1), best_i)
            best = tl.where(better, tm, best)
    tl.store(out_ptr + rows, best_i.to(tl.int64), mask=r_mask)


def _int_or_tensor(name, v, device):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype not in (torch.int32, torch.int64) or v.device != device:
            raise ValueError(f"{name} tensor must hold 1 int32/int64 element on {device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
        return True
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63) or a 1-element int tensor, got {v!r}")
    return False


def sample(logits, temperature, top_k=0, top_p=1.0, seed=0, offset=0, *,
           block_v=None, block_r=None):
    """Draw one token per row of logits [V] or [B, V] (fp32/bf16/fp16, last dim contiguous).

    temperature (python float >= 0; 0 = greedy), top_k (python int >= 0; 0 = off),
    top_p (python float in (0, 1]; 1 = off), seed and offset (python ints >= 0 or 1-element
    int tensors on the device, so a CUDA graph can advance the offset each step).
    Returns int64 [1] for [V] input, [B] for [B, V] input (row b draws with offset + b).
    No host sync.
    """
    if logits.dim() not in (1, 2) or logits.dtype not in _FLOAT_DTYPES or logits.stride(-1) != 1:
        raise ValueError(f"logits must be a [V] or [B, V] fp32/bf16/fp16 tensor with a contiguous "
                         f"last dim, got {logits.dtype} {tuple(logits.shape)} strides "
                         f"{logits.stride()}")
    x = logits if logits.dim() == 2 else logits[None, :]      # [B, V]
    B, V = x.shape
    if V == 0:
        raise ValueError("logits has an empty vocab dim")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a python float >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a python int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a python float in (0, 1] (1 = off), got {top_p!r}")
    seed_ptr = _int_or_tensor("seed", seed, x.device)
    offset_ptr = _int_or_tensor("offset", offset, x.device)
    out = torch.empty(B, device=x.device, dtype=torch.int64)
    if B == 0:
        return out
    if x.is_cuda:
        block_v = block_v or 4096
        block_r = block_r or 1
        num_warps = 8
    else:  # interpreter: vectorise over rows and the whole vocab
        block_v = block_v or min(32768, triton.next_power_of_2(V))
        block_r = block_r or max(1, min(triton.next_power_of_2(B), 65536 // block_v))
        num_warps = 4
    _sample_kernel[(triton.cdiv(B, block_r),)](
        x, x.stride(0), out, B, V, float(temperature) if temperature > 0 else 1.0,
        min(top_k, V), float(top_p), seed, offset,
        GREEDY=temperature == 0, TOP_K=0 < top_k < V, TOP_P=top_p < 1.0,
        SEED_IS_PTR=seed_ptr, OFFSET_IS_PTR=offset_ptr,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
    )
    return out


def sample_probs_ref(logits, temperature, top_k=0, top_p=1.0):
    """The distribution `sample` draws from: [B, V] fp32 (kept tokens renormalised, others 0).

    For temperature == 0 a one-hot at the argmax.
    """
    x = logits.float().reshape(-1, logits.shape[-1])             # [B, V]
    B, V = x.shape
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), V).float()
    z = x / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < V:
        kth = z.topk(top_k, dim=-1).values[:, -1:]                # [B, 1]
        keep &= z >= kth
    zk = torch.where(keep, z, float("-inf"))
    p = torch.softmax(zk, dim=-1)                                 # [B, V]
    if top_p < 1.0:
        sz, si = zk.sort(dim=-1, descending=True)
        sp = p.gather(-1, si)
        excl = torch.cat([torch.zeros_like(sp[:, :1]), sp.cumsum(-1)[:, :-1]], dim=-1)
        n_keep = (excl < top_p).sum(-1, keepdim=True)             # >= 1: excl[0] = 0
        keep &= z >= sz.gather(-1, n_keep - 1)
    p = torch.where(keep, p, 0.0)
    return p / p.sum(-1, keepdim=True)


def sample_ref(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """Torch reference of `sample` (same rules; the random stream is torch's, not Philox)."""
    p = sample_probs_ref(logits, temperature, top_k, top_p)      # [B, V]
    if temperature == 0:
        return p.argmax(-1)
    e = torch.empty_like(p).exponential_(generator=generator)    # E_i ~ Exp(1)
    return (p / e).argmax(-1)


__all__ = ["sample", "sample_ref", "sample_probs_ref"]
