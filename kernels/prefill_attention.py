"""Cross-model prefix prefill: RoPE + KV-cache write + causal attention in one launch.

The base model scores the pilot's chunk of L tokens in ONE forward appended to its cache:
new tokens sit at positions start_pos .. start_pos+L-1, the cache holds [0, start_pos).
One program handles a tile of BLOCK_T new tokens x all the GROUP query heads that share one
kv head (BLOCK_R = BLOCK_T * G_PAD rows), so each K/V block is read once per GQA group.

Why one launch is race-free: the cache slots [start_pos, start_pos+L) are written (rotated k,
v; by the split-0 program of each token tile) but never read by this kernel; the new keys
are read from the raw k/v inputs and rotated on the fly by every tile that needs them.

With few programs (small L, e.g. L=1 decode through this path) the key range is split in
NUM_SPLITS pieces (flash-decoding); the partial results are merged by the combine kernel
of `decode_attention.py` (a second launch). The split count never depends on start_pos'
value, so a device-tensor start_pos lets a CUDA graph replay at new positions.

Rows (`prefill_attention_rows`, a batch step's varlen chunks): B segments of new tokens,
segment b appended to its own slot of a [n_slots, n_kv, max_seq, hd] cache at its own start.
The same kernel with the segments folded into the first grid axis (B x the token tiles of
the longest segment, max_q): a program first moves its base pointers to segment b (its first
token row cu_seqlens[b], its start, its cache slab) and is then the single-sequence program;
a tile past its segment's end does nothing. Segments write distinct slots, so the one-launch
argument above holds per segment. The split workspace is indexed by global token row, so the
same combine kernel merges it.

Numerics: RoPE in fp32 (HF "rotate_half" layout), the rotated q and k rounded to the model
dtype (as stored in the cache; HF applies RoPE in the model dtype for bf16 -- our ref does
the fp32 math then casts, and so does the kernel), softmax and accumulation in fp32.

Gemma-2 (`scale`, `softcap`, `window` keywords; constexprs SOFTCAP / WINDOW, left at their
defaults = today's kernel): scores = scale * q.k, capped as softcap * tanh(s / softcap) in
fp32 before masking and the softmax; with a window a token at position p sees keys
p - window < j <= p: a tile starts its key loop at its first token's window (blocks below
are not read) and masks per row inside.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (attn_constexprs, attn_params, attn_scores, check_cache_heads,
                      check_device_scalar, check_dtype_device, check_ranks, check_rope_tables,
                      check_row_vector, dot, masked_attention_ref, rope_rotate, rotate_half, softmax_update,
                      token_attention_ref)
from ._device import num_sms
from .decode_attention import combine_splits


@triton.jit(do_not_specialize=["pos_val"])
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr,
    out_ptr, o_part_ptr, lse_part_ptr, pos_ptr,
    pos_val, n_tokens, pos_limit, n_q_heads, qk_scale,
    stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh,
    stride_kch, stride_kcs, stride_vch, stride_vcs, stride_cos,
    stride_ol, stride_oh, stride_po, stride_pl,
    # ROWS: segment b = program_id(0) // tiles_per_row; tokens cu[b]..cu[b+1]-1 of q/k/v/out,
    # positions pos_ptr[b].., cache slab slot_ptr[b] (stride_kcb / stride_vcb apart)
    cu_ptr, slot_ptr, tiles_per_row, stride_kcb, stride_vcb,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, POS_FROM_PTR: tl.constexpr, FP32_DOT: tl.constexpr,
    ROWS: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0, WINDOW: tl.constexpr = 0,
):
    # SOFTCAP > 0: scores capped (cap * tanh(s / cap), natural units, qk_scale = the plain
    # scale) before masking and the softmax; WINDOW > 0: a query at position p sees keys
    # p - WINDOW < j <= p (key blocks below the tile's lowest window are not read)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    if ROWS:   # move every base pointer to segment b; below, it is a single-sequence program
        seg = tl.program_id(0) // tiles_per_row
        pid_t = tl.program_id(0) % tiles_per_row
        base = tl.load(cu_ptr + seg).to(tl.int64)                      # its first token row
        n_tokens = (tl.load(cu_ptr + seg + 1) - base).to(tl.int32)
        start = tl.load(pos_ptr + seg).to(tl.int32)
        slot = tl.load(slot_ptr + seg).to(tl.int64)   # int64: slot * stride_kcb may pass 2^31
        q_ptr += base * stride_ql
        k_ptr += base * stride_kl
        v_ptr += base * stride_vl
        out_ptr += base * stride_ol
        o_part_ptr += base * n_q_heads * HEAD_DIM     # workspace row (token * n_q + head)
        lse_part_ptr += base * n_q_heads
        kc_ptr += slot * stride_kcb
        vc_ptr += slot * stride_vcb
    else:
        pid_t = tl.program_id(0)
        if POS_FROM_PTR:
            start = tl.load(pos_ptr).to(tl.int32)
        else:
            start = pos_val
    model_dtype = kc_ptr.dtype.element_ty

    offs_d = tl.arange(0, HEAD_DIM)                                     # [HD]
    partner_d = (offs_d + HALF) % HEAD_DIM                              # [HD]

    # ---- rows of this tile: token-major, GQA group minor --------------------------------
    offs_r = tl.arange(0, BLOCK_R)                                      # [R]
    tok = pid_t * BLOCK_T + offs_r // G_PAD                             # [R] new-token index
    g = offs_r % G_PAD                                                  # [R]
    head = kvh * GROUP + g                                              # [R] query head
    q_pos = start + tok                                                 # [R]
    row_ok = (g < GROUP) & (tok < n_tokens) & (q_pos >= 0) & (q_pos < pos_limit)  # [R]

    q_off = tok[:, None] * stride_ql + head[:, None] * stride_qh         # [R, 1]
    q = tl.load(q_ptr + q_off + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + partner_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    cs_off = q_pos[:, None] * stride_cos + offs_d[None, :]               # [R, HD]
    cos_q = tl.load(cos_ptr + cs_off, mask=row_ok[:, None], other=0.0)
    sin_q = tl.load(sin_ptr + cs_off, mask=row_ok[:, None], other=0.0)
    q = rope_rotate(q, q2, cos_q, sin_q, offs_d, HALF).to(model_dtype)   # [R, HD] as HF/cache
    if FP32_DOT:
        q = q.to(tl.float32)

    # ---- write this tile's rotated k and v into the cache (once: split 0) ----------------
    if split == 0:
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                # [T]
        t_pos = start + offs_t                                          # [T]
        t_ok = ((offs_t < n_tokens) & (t_pos >= 0) & (t_pos < pos_limit))[:, None]  # [T, 1]
        k_off = offs_t[:, None] * stride_kl + kvh * stride_kh
        kx = tl.load(k_ptr + k_off + offs_d[None, :], mask=t_ok, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + k_off + partner_d[None, :], mask=t_ok, other=0.0).to(tl.float32)
        ct_off = t_pos[:, None] * stride_cos + offs_d[None, :]
        cos_t = tl.load(cos_ptr + ct_off, mask=t_ok, other=0.0)
        sin_t = tl.load(sin_ptr + ct_off, mask=t_ok, other=0.0)
        k_rot = rope_rotate(kx, k2, cos_t, sin_t, offs_d, HALF)          # [T, HD]
        tl.store(kc_ptr + kvh * stride_kch + t_pos[:, None] * stride_kcs + offs_d[None, :],
                 k_rot.to(model_dtype), mask=t_ok)
        vx = tl.load(v_ptr + offs_t[:, None] * stride_vl + kvh * stride_vh + offs_d[None, :],
                     mask=t_ok, other=0.0)
        tl.store(vc_ptr + kvh * stride_vch + t_pos[:, None] * stride_vcs + offs_d[None, :],
                 vx.to(model_dtype), mask=t_ok)

    # ---- key range of this program: [lo, hi) in absolute positions ----------------------
    t_end = tl.minimum(n_tokens, (pid_t + 1) * BLOCK_T)                 # causal bound of the tile
    kv_end = tl.minimum(start + t_end, pos_limit)
    if ROWS:   # a tile past its segment's end (the grid is sized for the longest): no keys
        kv_end = tl.where(pid_t * BLOCK_T < n_tokens, kv_end, 0)
    if NUM_SPLITS == 1:
        lo = 0
        hi = kv_end
    else:
        total = start + n_tokens
        chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, kv_end)
    if WINDOW > 0:   # the tile's first query sees keys > its position - WINDOW
        lo = tl.maximum(lo, start + pid_t * BLOCK_T - WINDOW + 1)

    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)                 # running max (log2 units)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)                         # running sum of exp2
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)               # [R, HD]

    # cached prefix [lo, min(hi, start)): read from the cache (already rotated)
    p_hi = tl.minimum(hi, start)
    kc_base = kc_ptr + kvh * stride_kch
    vc_base = vc_ptr + kvh * stride_vch
    for n0 in range(lo, p_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)                             # [N]
        n_ok = offs_n < p_hi
        k = tl.load(kc_base + offs_n[:, None] * stride_kcs + offs_d[None, :],
                    mask=n_ok[:, None], other=0.0)                      # [N, HD]
        v = tl.load(vc_base + offs_n[:, None] * stride_vcs + offs_d[None, :],
                    mask=n_ok[:, None], other=0.0)                      # [N, HD]
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = attn_scores(dot(q, tl.trans(k), FP32_DOT), qk_scale, SOFTCAP)   # [R, N] log2
        if WINDOW > 0:
            s = tl.where(n_ok[None, :] & (offs_n[None, :] > q_pos[:, None] - WINDOW), s,
                         float("-inf"))
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, FP32_DOT)

    # new tokens [max(lo, start), hi): raw k/v inputs, k rotated here, causal mask
    j_lo = tl.maximum(lo, start) - start
    j_hi = hi - start
    # Not software-pipelined: its k, k-partner, cos, sin (fp32) and v tiles x 3 stages need
    # 288 KB of smem (sm_90 compile, 128 rows x 64 keys, hd 128) > the H100's 227 KB; with
    # num_stages=1 here the kernel needs 128 KB. The cached prefix loop (most bytes) pipelines.
    for j0 in tl.range(j_lo, j_hi, BLOCK_N, num_stages=1):
        offs_j = j0 + tl.arange(0, BLOCK_N)                             # [N] new-token index
        j_ok = offs_j < j_hi
        k_off = offs_j[:, None] * stride_kl + kvh * stride_kh
        kx = tl.load(k_ptr + k_off + offs_d[None, :], mask=j_ok[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + k_off + partner_d[None, :], mask=j_ok[:, None],
                     other=0.0).to(tl.float32)
        cj_off = (start + offs_j)[:, None] * stride_cos + offs_d[None, :]
        cos_j = tl.load(cos_ptr + cj_off, mask=j_ok[:, None], other=0.0)
        sin_j = tl.load(sin_ptr + cj_off, mask=j_ok[:, None], other=0.0)
        k = rope_rotate(kx, k2, cos_j, sin_j, offs_d, HALF).to(model_dtype)  # [N, HD] as cached
        v = tl.load(v_ptr + offs_j[:, None] * stride_vl + kvh * stride_vh + offs_d[None, :],
                    mask=j_ok[:, None], other=0.0).to(model_dtype)      # [N, HD]
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = attn_scores(dot(q, tl.trans(k), FP32_DOT), qk_scale, SOFTCAP)   # [R, N] log2
        visible = j_ok[None, :] & (offs_j[None, :] <= tok[:, None])
        if WINDOW > 0:
            visible = visible & (offs_j[None, :] > tok[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, FP32_DOT)

    # ---- epilogue ---------------------------------------------------------------------
    if NUM_SPLITS == 1:
        if WINDOW > 0:   # a padding row past the tokens may see no key: no 0 / 0
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        else:
            o = acc / l_i[:, None]                                      # every row sees itself
        tl.store(out_ptr + tok[:, None] * stride_ol + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        has = l_i > 0.0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # [R]
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        row = tok * n_q_heads + head                                    # [R] row of [L*n_q]
        tl.store(o_part_ptr + split * stride_po + row[:, None] * HEAD_DIM + offs_d[None, :],
                 o, mask=row_ok[:, None])
        tl.store(lse_part_ptr + split * stride_pl + row, lse, mask=row_ok)


def _choose_splits(n_programs: int, key_bound: int, block_n: int, device: torch.device) -> int:
    """Split the keys only when the (token tile x kv head) grid fills < half the SMs.

    E.g. Llama-3.1-8B (n_kv=8) on an H100 (132 SMs): L=1..32 -> 8 programs, L=64 -> 16,
    L=512 -> 128 (no split). Target ~2 programs per SM, >= 2 key blocks per piece; e.g.
    L=1 at int start_pos 1000 -> 8 pieces, with a tensor start_pos and max_seq 8192 -> 32.
    """
    if device.type != "cuda":
        return 1
    sms = num_sms(device)
    if n_programs >= sms // 2:
        return 1
    max_useful = triton.cdiv(key_bound, 2 * block_n)
    n = max(1, min(triton.cdiv(2 * sms, n_programs), max_useful, 64))
    return 1 << (n.bit_length() - 1)    # a power of two: no padding in the combine tile


def prefill_config(L: int, group: int, hd: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes. rows = BLOCK_T tokens x the GQA group padded to a power of two.

    GPU bf16/fp16 (sm_90 AOT compiles with triton 3.7 on a CPU machine, hd=128, group 4; not
    yet timed on a GPU): 128 rows x 64 keys, 8 warps, 3 stages -> 128 KB smem, 246 regs, no
    spills, wgmma; fewer rows for small L (tl.dot needs >= 16): 16 rows -> 70 KB, 158 regs.
    fp32 on GPU ("ieee" FMA dots, a correctness path, not a fast one): 64 rows x 32 keys,
    8 warps, 2 stages (still ~2 KB of stack per thread; 128 x 64 would spill 12 KB).
    """
    g_pad = triton.next_power_of_2(group)
    block_r = max(g_pad, min(128, max(16, triton.next_power_of_2(L * g_pad))))
    if device.type != "cuda":   # interpreter: big tiles, fewer Python-level ops
        return dict(block_r=block_r, block_n=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        block_r = max(g_pad, min(block_r, 64))
        return dict(block_r=block_r, block_n=32, num_warps=8 if block_r >= 64 else 4, num_stages=2)
    if hd > 128:   # 64 rows, hd 256 (Gemma-2 9B): 4 warps spill 160 B at 255 regs, 8 do not
        block_r = max(g_pad, min(block_r, 64))
        return dict(block_r=block_r, block_n=32, num_warps=8 if block_r >= 64 else 4,
                    num_stages=2)
    # 64 rows, hd 128: 4 warps spill (255 regs + 24 B stack), 8 warps do not (229 regs).
    wide = block_r >= 128 or (block_r >= 64 and hd >= 128)
    return dict(block_r=block_r, block_n=64, num_warps=8 if wide else 4, num_stages=3)


def prefill_attention(q, k, v, k_cache, v_cache, cos, sin, start_pos, out=None, *,
                      num_splits=None, block_r=None, block_n=None, num_warps=None, num_stages=None,
                      scale: float | None = None, softcap: float | None = None,
                      window: int | None = None):
    """RoPE q/k, write k/v at positions start_pos.., causal attention over cache + new tokens.

    Gemma-2 options: scale (None: head_dim ** -0.5) multiplies q.k; softcap (None: off)
    caps the scaled scores, softcap * tanh(s / softcap), before masking and the softmax;
    window (None: off): a token at position p sees keys p - window < j <= p only.

    q [L, n_q, hd], k/v [L, n_kv, hd] (not rotated; any strides with stride(-1) == 1);
    k_cache/v_cache [n_kv, max_seq, hd] (model dtype, positions [0, start_pos) filled);
    cos/sin [>= max_seq, hd] fp32; start_pos: int or 1-element int32/int64 tensor on q's
    device (read in the kernel: no host sync; positions past the cache/cos table are then
    skipped, not checked). Writes k_cache/v_cache[:, start_pos:start_pos+L] in place.
    Returns out [L, n_q, hd] in q's dtype (written into `out` when given).
    """
    L, n_q, hd, n_kv, max_seq = _validate(q, k, v, k_cache, v_cache, cos, sin, start_pos, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [L, n_q, hd]
    pos_is_tensor = isinstance(start_pos, torch.Tensor)
    key_bound = max_seq if pos_is_tensor else start_pos + L
    _launch("prefill_attention", q, k, v, k_cache, v_cache, cos, sin, out, L, 1,
            start_pos if pos_is_tensor else None, 0 if pos_is_tensor else int(start_pos),
            None, None, key_bound, num_splits=num_splits, block_r=block_r, block_n=block_n,
            num_warps=num_warps, num_stages=num_stages,
            attn=attn_params("prefill_attention", hd, scale, softcap, window))
    return out


def prefill_attention_rows(q, k, v, k_cache, v_cache, cos, sin, cu_seqlens, seg_slots,
                           seg_starts, max_q: int, out=None, *, num_splits=None, block_r=None,
                           block_n=None, num_warps=None, num_stages=None,
                           scale: float | None = None, softcap: float | None = None,
                           window: int | None = None):
    """Varlen prefill / chunk scoring: B segments of new tokens, each appended to its own slot.

    q [T, n_q, hd], k / v [T, n_kv, hd] unrotated (any strides with stride(-1) == 1, e.g.
    views of a fused qkv projection); segment b is token rows cu_seqlens[b]..cu_seqlens[b+1]-1
    (cu_seqlens [B+1] int32/int64 on q's device, cu_seqlens[0] = 0, cu_seqlens[B] = T,
    non-decreasing), at positions seg_starts[b] + i (seg_starts [B] int32/int64) of cache
    slot seg_slots[b] (seg_slots [B] int32/int64; distinct per segment: segment b writes its
    slot); k_cache / v_cache [n_slots, n_kv, max_seq, hd] (model dtype, stride(-1) == 1, slot
    positions [0, seg_starts[b]) filled); cos / sin [>= max_seq, hd] fp32 RoPE tables.
    Per token: RoPE q and k, k / v written into the cache, causal attention over its slot's
    positions [0, its position]. max_q: a host bound on the longest segment (sizes the grid:
    B * cdiv(max_q, BLOCK_T) token tiles x n_kv; longer segments lose their tail tokens).
    Device values are read only by the kernel (no host sync, CUDA-graph capturable; positions
    past the cache / tables are skipped, not checked). Segments of length 0 are allowed.
    The keywords are `prefill_attention`'s (scale / softcap / window included). Returns
    out [T, n_q, hd] in q's dtype.
    """
    fn = "prefill_attention_rows"
    check_ranks(fn, (("q", q, 3), ("k", k, 3), ("v", v, 3), ("k_cache", k_cache, 4),
                     ("v_cache", v_cache, 4), ("cos", cos, 2), ("sin", sin, 2)))
    T, n_q, hd = q.shape
    n_kv, max_seq = check_cache_heads(fn, n_q, hd, k_cache, v_cache)
    if T < 1:
        raise ValueError(f"{fn}: q has no tokens (T == 0)")
    if k.shape != (T, n_kv, hd) or v.shape != (T, n_kv, hd):
        raise ValueError(f"{fn}: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[T, n_kv, hd] = {(T, n_kv, hd)}")
    check_dtype_device(fn, q, {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache},
                       {"cos": cos, "sin": sin})
    check_rope_tables(fn, cos, sin, 1, hd, q.device)   # rows past the table are skipped
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(f"{fn}: cu_seqlens must be a [B+1] int tensor on {q.device}")
    B = cu_seqlens.shape[0] - 1
    if B < 1:
        raise ValueError(f"{fn}: cu_seqlens {tuple(cu_seqlens.shape)} holds no segment")
    check_row_vector(fn, "cu_seqlens", cu_seqlens, B + 1, q.device)
    check_row_vector(fn, "seg_slots", seg_slots, B, q.device)
    check_row_vector(fn, "seg_starts", seg_starts, B, q.device)
    if B > k_cache.shape[0]:
        raise ValueError(f"{fn}: {B} segments for {k_cache.shape[0]} cache slots")
    if isinstance(max_q, bool) or not isinstance(max_q, int) or not 1 <= max_q <= T:
        raise ValueError(f"{fn}: max_q must be an int in [1, T={T}], got {max_q!r}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, n_q, hd]
    elif (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
          or out.stride(-1) != 1):
        raise ValueError(f"{fn}: out must be {tuple(q.shape)} {q.dtype} on {q.device} with "
                         f"unit last-dim stride, got {tuple(out.shape)} {out.dtype}")
    _launch(fn, q, k, v, k_cache, v_cache, cos, sin, out, max_q, B, seg_starts, 0,
            cu_seqlens, seg_slots, max_seq, num_splits=num_splits, block_r=block_r,
            block_n=block_n, num_warps=num_warps, num_stages=num_stages,
            attn=attn_params(fn, hd, scale, softcap, window))
    return out


def _launch(fn, q, k, v, k_cache, v_cache, cos, sin, out, L, n_seg, pos_t, pos_val,
            cu_seqlens, seg_slots, key_bound, *, num_splits, block_r, block_n, num_warps,
            num_stages, attn=None):
    """Launch `_prefill_attention_kernel` on validated inputs: one sequence of L tokens
    (cu_seqlens None; cache [n_kv, S, hd]) or n_seg segments of <= L tokens (cache
    [n_slots, n_kv, S, hd]). pos_t: the start position tensor(s) (None: pos_val is it)."""
    rows = cu_seqlens is not None
    T, n_q, hd = q.shape
    n_kv, max_seq = k_cache.shape[-3], k_cache.shape[-2]
    group = n_q // n_kv
    g_pad = triton.next_power_of_2(group)
    qk_scale, softcap, window = attn if attn is not None else attn_params(fn, hd, None, None,
                                                                          None)
    gemma = attn_constexprs(softcap, window)
    cfg = prefill_config(L, group, hd, q.dtype, q.device)
    block_r = block_r or cfg["block_r"]
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if block_r < max(16, g_pad) or block_r & (block_r - 1) or block_n < 16 \
            or block_n & (block_n - 1):
        raise ValueError(f"{fn}: block_r={block_r} / block_n={block_n} must be powers "
                         f"of two >= 16 (block_r >= the padded GQA group {g_pad})")
    block_t = block_r // g_pad
    n_tiles = triton.cdiv(L, block_t)                   # token tiles per sequence / segment
    pos_limit = min(max_seq, cos.shape[0])
    if num_splits is None:
        num_splits = _choose_splits(n_seg * n_tiles * n_kv, key_bound, block_n, q.device)
    if num_splits < 1:
        raise ValueError(f"{fn}: num_splits must be >= 1, got {num_splits}")
    if num_splits > 1:   # rows token * n_q + head of all T tokens: what combine_splits reads
        o_part = torch.empty((num_splits, T * n_q, hd), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, T * n_q), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out   # unused
    if rows:
        row_args = (cu_seqlens, seg_slots, n_tiles, k_cache.stride(0), v_cache.stride(0))
    else:
        row_args = (cos, cos, 1, 0, 0)                                  # unused
    _prefill_attention_kernel[(n_seg * n_tiles, n_kv, num_splits)](
        q, k, v, k_cache, v_cache, cos, sin, out, o_part, lse_part,
        pos_t if pos_t is not None else cos,
        pos_val, L, pos_limit, n_q, qk_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(-3), k_cache.stride(-2), v_cache.stride(-3), v_cache.stride(-2),
        cos.stride(0), out.stride(0), out.stride(1), T * n_q * hd, T * n_q,
        *row_args,
        GROUP=group, G_PAD=g_pad, HEAD_DIM=hd, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, POS_FROM_PTR=pos_t is not None,
        # CPU tensors run only under the interpreter, whose bf16 dots are wrong: fp32 there.
        FP32_DOT=(q.dtype == torch.float32 or q.device.type != "cuda"),
        num_warps=num_warps, num_stages=num_stages, ROWS=rows, **gemma,
    )
    if num_splits > 1:
        combine_splits(o_part, lse_part, out, n_q)


def _validate(q, k, v, k_cache, v_cache, cos, sin, start_pos, out):
    check_ranks("prefill_attention", (("q", q, 3), ("k", k, 3), ("v", v, 3),
                                       ("k_cache", k_cache, 3), ("v_cache", v_cache, 3),
                                       ("cos", cos, 2), ("sin", sin, 2)))
    L, n_q, hd = q.shape
    n_kv, max_seq = check_cache_heads("prefill_attention", n_q, hd, k_cache, v_cache)
    if L < 1:
        raise ValueError("prefill_attention: q has no tokens (L == 0)")
    if k.shape != (L, n_kv, hd) or v.shape != (L, n_kv, hd):
        raise ValueError(f"prefill_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[L, n_kv, hd] = {(L, n_kv, hd)} (q is {tuple(q.shape)}, "
                         f"k_cache is {tuple(k_cache.shape)})")
    if cos.shape != sin.shape or cos.shape[1] != hd or cos.dtype != torch.float32 \
            or sin.dtype != torch.float32:
        raise ValueError(f"prefill_attention: cos {tuple(cos.shape)} {cos.dtype} and sin "
                         f"{tuple(sin.shape)} {sin.dtype} must be fp32 [max_seq, hd={hd}]")
    check_dtype_device("prefill_attention", q, {"k": k, "v": v, "k_cache": k_cache,
                                                 "v_cache": v_cache}, {"cos": cos, "sin": sin})
    limit = min(max_seq, cos.shape[0])
    if isinstance(start_pos, torch.Tensor):
        check_device_scalar("prefill_attention", "start_pos", start_pos, q.device)
    else:
        start_pos = int(start_pos)
        if start_pos < 0 or start_pos + L > limit:
            raise ValueError(f"prefill_attention: positions [{start_pos}, {start_pos + L}) do not "
                             f"fit the cache / rope tables ({max_seq} / {cos.shape[0]} positions)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"prefill_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device} "
                         f"with unit last-dim stride, got {tuple(out.shape)} {out.dtype}")
    return L, n_q, hd, n_kv, max_seq


def prefill_attention_ref(q, k, v, k_cache, v_cache, cos, sin, start_pos, out=None, *,
                          scale=None, softcap=None, window=None):
    """Pure torch: fp32 RoPE (cast to the model dtype), cache write, SDPA with a bool mask
    (scale / softcap / window: explicit fp32 scores, capped, windowed mask, fp32 softmax)."""
    L, n_q, hd = q.shape
    n_kv = k_cache.shape[0]
    start = int(start_pos.item()) if isinstance(start_pos, torch.Tensor) else int(start_pos)
    end = start + L
    c = cos[start:end, None, :]                                         # [L, 1, hd]
    s = sin[start:end, None, :]
    q_rot = (q.float() * c + rotate_half(q.float()) * s).to(q.dtype)   # [L, n_q, hd]
    k_rot = (k.float() * c + rotate_half(k.float()) * s).to(k_cache.dtype)
    k_cache[:, start:end] = k_rot.transpose(0, 1)                       # [n_kv, L, hd]
    v_cache[:, start:end] = v.to(v_cache.dtype).transpose(0, 1)
    keys = k_cache[:, :end].float().repeat_interleave(n_q // n_kv, dim=0)    # [n_q, end, hd]
    vals = v_cache[:, :end].float().repeat_interleave(n_q // n_kv, dim=0)
    pos_q = torch.arange(start, end, device=q.device)[:, None]          # [L, 1]
    mask = torch.arange(end, device=q.device)[None, :] <= pos_q         # [L, end]
    if window is not None:
        mask = mask & (torch.arange(end, device=q.device)[None, :] > pos_q - window)
    o = masked_attention_ref(q_rot.float().transpose(0, 1), keys, vals, mask, scale,
                              softcap)                                  # [n_q, L, hd]
    o = o.transpose(0, 1).to(q.dtype)                                   # [L, n_q, hd]
    if out is not None:
        out.copy_(o)
        return out
    return o


def prefill_attention_rows_ref(q, k, v, k_cache, v_cache, cos, sin, cu_seqlens, seg_slots,
                               seg_starts, max_q: int | None = None, out=None, *,
                               scale=None, softcap=None, window=None):
    """Pure torch, all tokens at once: token t of segment b sits at position
    seg_starts[b] + (t - cu_seqlens[b]) of slot seg_slots[b]. fp32 RoPE (cast to the model
    dtype), every k / v written into the cache in place, then SDPA (fp32) of each token over
    its slot's positions [0, its position] (a [T, max_seq] bool mask). max_q is unused (the
    kernel's grid bound). Shapes as `prefill_attention_rows`; returns [T, n_q, hd]."""
    T = q.shape[0]
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]                                             # [B]
    seg = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens)   # [T]
    pos = seg_starts.long()[seg] + torch.arange(T, device=q.device) - cu[:-1][seg]  # [T]
    return token_attention_ref(q, k, v, k_cache, v_cache, cos, sin, seg_slots.long()[seg],
                               pos, out, scale, softcap, window)
