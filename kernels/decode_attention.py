"""Decode attention: one query token against a long KV cache, split along the sequence.

Batch-1 decode has n_kv programs' worth of work per layer (8 for Llama-3.1-8B), far too few
to fill a GPU, so the sequence is cut in NUM_SPLITS pieces (flash-decoding):
  stage 1, grid (n_kv, NUM_SPLITS): one program = all GROUP query heads of one kv head (each
           K/V block is read once per GQA group) over one piece; writes the piece's
           normalised output and log-sum-exp (base 2) to an fp32 workspace;
  stage 2: merges the pieces (`combine_splits`, shared with the split path of
           `prefill_attention`).
Fused variant (`fused_combine=True`): one launch. After writing its piece, each program bumps
a per-kv-head int32 counter (atomic, acq_rel, gpu scope; a CTA barrier first so every
thread's partial stores precede the release); the program that arrives last (old count ==
NUM_SPLITS - 1) merges its kv head's pieces, writes the output and resets the counter to 0.
The counters are one preallocated, zero-initialised buffer per (device, n_kv) that every
call reuses (no host work per call, CUDA-graph replayable); calls sharing it must not run
concurrently (one stream, as in a decode step).
The grid never depends on seq_len: a fixed number of pieces covers [0, seq_len) evenly
(piece length rounded up to BLOCK_N, computed in the kernel), pieces past the end write an
empty result. With seq_len a device tensor the launch is CUDA-graph replayable at any length.

Short contexts (MIN_PIECE > 0): the grid is sized for the longest context the cache holds,
so at a few hundred keys most pieces would be empty. The kernel then uses only
n_act = clamp(cdiv(keys, MIN_PIECE), 1, NUM_SPLITS) pieces, computed from the length it
reads: in the fused path the programs past n_act load nothing, store nothing and do not
arrive at the counter, and the last of the n_act pieces merges only those n_act partials
(at 300 keys and MIN_PIECE 128: 3 partials, not 32); with one piece in use (<= MIN_PIECE
keys) that piece writes the output itself: no partial, no counter, no merge. The unfused
path keeps its empty stores (its combine kernel reads every piece).

Append mode (`k_new`, `v_new`, optionally `cos`/`sin`): the decode step's new token, at
position seq_len - 1, is not in the cache yet. Every program rotates its q heads (RoPE at
that position) itself; the pieces cover the cached [0, seq_len - 1); piece 0 also rotates
the new key, writes it and the new value into the cache (no other program reads that row)
and folds the token into its softmax as one more key. RoPE, the cache write and the
attention are then one launch.

Rows (`decode_attention_rows`, a batched decode step): B requests, one new token each, each
in its own slot of a [n_slots, n_kv, max_seq, hd] cache. The same kernel with a third grid
axis: program (kv head, piece, row b) first moves its base pointers to row b (q, k_new,
v_new, out, the length = positions[b] + 1, its workspace rows b * n_q + head, its arrival
counter b * n_kv + kv head) and, after the PDL wait, to the cache slab of slots[b]; from there
it is the single-sequence append-mode program. Each row picks its own n_act from its own
length, so a short row next to a long one uses few pieces. Rows have distinct slots, so
piece 0 of row b writing (slots[b], positions[b]) races with no other program.

PDL (`pdl=True`, sm_90+, see `pdl.py`): the kernel waits for its predecessor (the qkv
projection that wrote q / k_new / v_new) before its first load and then lets the next kernel
launch, so the next projection's programs are resident and streaming their weights while
this one runs. Before the wait each program asks L2 for the first PREFETCH_TILES key blocks
of its piece (K and V: `prefetch.global.L2`, a hint that returns nothing), computed from the
length as read then; everything after the wait reads the length again, so a length written
by the predecessor only makes the hint useless, never the result wrong. The cache prefix is
written by earlier steps, complete by then (pdl.py, rule 2).

Gemma-2 (`scale`, `softcap`, `window` keywords; constexprs SOFTCAP / WINDOW, left at their
defaults = today's kernel): scores = scale * q.k, capped as softcap * tanh(s / softcap) in
fp32 natural units and then converted to log2 units; a window makes the pieces cover only
the cached keys inside it, [max(0, seq_len - window), n_cached), so the blocks below it are
never read and the piece count follows the window, not the length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (attn_constexprs, attn_params, attn_scores, attn_scores_ref,
                      check_cache_heads, check_device_scalar, check_dtype_device, check_ranks,
                      check_rope_tables, check_row_vector, dot, round_to, softmax_update,
                      token_attention_ref)
from ._device import num_sms
from .pdl import pdl_wait_then_release, prefetch_l2, use_pdl

# decode_attention(fused_combine=None) uses this. False until a GPU measurement shows the
# one-launch variant wins (benchmarks/bench_attention.py: "triton_fused" vs "triton").
FUSED_COMBINE_DEFAULT = True   # H200 2026-11-27: 7.9 vs 10.4 us at 1k, 20.0 vs 22.4 at 8k, 45.7 vs 48.5 at 32k

# decode_attention(min_piece=None) uses this: pieces of at least this many keys, so a short
# context uses few pieces (see the module docstring). 0 = always NUM_SPLITS pieces.
# UNMEASURED on a GPU (written without one): 128 keys = two 64-key blocks per program; at
# >= 4k keys and 32 pieces nothing changes. benchmarks/bench_attention.py --sweep times
# min_piece 0 / 64 / 128 / 256 at 256 keys to 8k.
MIN_PIECE_DEFAULT = 128

_SPLIT_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def split_counters(device: torch.device, n_kv: int) -> torch.Tensor:
    """The fused path's per-kv-head arrival counters: int32 [n_kv], zero between calls.

    Allocated (zeroed) once per (device, n_kv) and reused by every call; the kernel's last
    program per kv head puts its counter back to 0. Make the first fused call before a CUDA
    graph capture (the usual warm-up) so the buffer does not come from the graph's pool."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, n_kv)
    cnt = _SPLIT_COUNTERS.get(key)
    if cnt is None:
        cnt = _SPLIT_COUNTERS[key] = torch.zeros(n_kv, dtype=torch.int32, device=device)
    return cnt


@triton.jit
def _combine_group(o_part_ptr, lse_part_ptr, out_ptr, kvh, n_act, stride_oh, stride_po,
                   stride_pl, GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   S_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Fused stage 2 for the GROUP query heads of kv head `kvh` (run by the last program):
    merges pieces [0, n_act) (n_act <= S_PAD, the pieces in use at this length).

    Loads bypass L1 (.cg): the pieces were written by other SMs during this launch."""
    offs_g = tl.arange(0, G_PAD)                                        # [G]
    g_ok = offs_g < GROUP
    head = kvh * GROUP + offs_g                                         # [G]
    offs_d = tl.arange(0, HEAD_DIM)                                     # [HD]
    offs_s = tl.arange(0, S_PAD)                                        # [S]
    lse = tl.load(lse_part_ptr + offs_s[:, None] * stride_pl + head[None, :],
                  mask=(offs_s < n_act)[:, None] & g_ok[None, :], other=float("-inf"),
                  cache_modifier=".cg")                                 # [S, G]
    m = tl.max(lse, 0)                                                  # [G]
    m = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.sum(tl.exp2(lse - m[None, :]), 0)                        # [G]; empty pieces -> 0
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)                 # [G, HD]
    for s0 in range(0, n_act, BLOCK_S):
        offs_c = s0 + tl.arange(0, BLOCK_S)                             # [C]
        ok = (offs_c < n_act)[:, None] & g_ok[None, :]                  # [C, G]
        w = tl.exp2(tl.load(lse_part_ptr + offs_c[:, None] * stride_pl + head[None, :],
                            mask=ok, other=float("-inf"), cache_modifier=".cg")
                    - m[None, :])                                       # [C, G]
        o = tl.load(o_part_ptr + offs_c[:, None, None] * stride_po
                    + head[None, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None], other=0.0, cache_modifier=".cg")   # [C, G, HD]
        acc += tl.sum(o * w[:, :, None], 0)
    o = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    tl.store(out_ptr + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _piece_range(len_ptr, len_val, max_seq, split, LEN_FROM_PTR: tl.constexpr,
                 LEN_OFFSET: tl.constexpr, APPEND: tl.constexpr, MIN_PIECE: tl.constexpr,
                 NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr = 0):
    """seq_len, the keys read from the cache, the pieces in use, and this piece's [lo, hi).
    WINDOW > 0 (sliding window: keys j > seq_len - 1 - WINDOW): the pieces cover only the
    cached keys inside the window, [max(0, seq_len - WINDOW), n_cached); the blocks below
    it are never read, and the piece count follows the keys in the window."""
    if LEN_FROM_PTR:   # + LEN_OFFSET: the caller may pass the new token's position
        seq_len = tl.load(len_ptr).to(tl.int32) + LEN_OFFSET
    else:
        seq_len = len_val
    seq_len = tl.minimum(seq_len, max_seq)
    n_cached = seq_len                                  # keys read from the cache
    if APPEND:
        n_cached = seq_len - 1
    n_keys = n_cached                                   # keys the pieces cover
    if WINDOW > 0:   # from the first key inside the window (not a multiple of BLOCK_N)
        n_keys = tl.maximum(n_cached - tl.maximum(seq_len - WINDOW, 0), 0)
    if MIN_PIECE > 0:   # pieces in use at this length (>= 1: piece 0 holds an appended token)
        n_act = tl.minimum(tl.maximum(tl.cdiv(n_keys, MIN_PIECE), 1), NUM_SPLITS)
    else:
        n_act = n_keys * 0 + NUM_SPLITS
    chunk = tl.cdiv(tl.cdiv(n_keys, n_act), BLOCK_N) * BLOCK_N
    lo = split * chunk      # split >= n_act: lo >= n_act * chunk >= n_keys, no keys
    if WINDOW > 0:
        lo = lo + tl.maximum(seq_len - WINDOW, 0)
    hi = tl.minimum(lo + chunk, n_cached)
    return seq_len, n_cached, n_act, lo, hi


@triton.jit
def _prefetch_piece(kc_base, vc_base, stride_kcs, stride_vcs, lo, hi,
                    TILES: tl.constexpr, BLOCK_N: tl.constexpr, LINES: tl.constexpr,
                    LINE_ELEMS: tl.constexpr):
    """L2 prefetch of K and V rows [lo, min(lo + TILES * BLOCK_N, hi)): LINES 128-byte lines
    per row. Rows past the range are clamped onto its last row (addresses stay inside)."""
    if lo < hi:
        rows = tl.minimum(lo + tl.arange(0, TILES * BLOCK_N), hi - 1).to(tl.int64)   # [R]
        lines = tl.arange(0, LINES) * LINE_ELEMS                                      # [L]
        prefetch_l2(kc_base + rows[:, None] * stride_kcs + lines[None, :])
        prefetch_l2(vc_base + rows[:, None] * stride_vcs + lines[None, :])


@triton.jit(do_not_specialize=["len_val"])
def _decode_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, o_part_ptr, lse_part_ptr, len_ptr, cnt_ptr,
    len_val, max_seq, qk_scale,
    stride_qh, stride_kch, stride_kcs, stride_vch, stride_vcs, stride_oh, stride_po, stride_pl,
    kn_ptr, vn_ptr, stride_knh, stride_vnh,   # [n_kv, HD] the new token's k, v (APPEND)
    cos_ptr, sin_ptr, stride_tab,             # [max_seq, HD] fp32 RoPE tables (ROPE)
    # ROWS: row b = program_id(2) of a batch; its q / k_new / v_new / out at b * stride_*b,
    # its cache slab at slot[b] * stride_kcb / stride_vcb, its length at len_ptr + b
    slot_ptr, n_slots, stride_qb, stride_ob, stride_knb, stride_vnb, stride_kcb, stride_vcb,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, LEN_FROM_PTR: tl.constexpr, FP32_DOT: tl.constexpr,
    FUSED: tl.constexpr = False, G_PAD: tl.constexpr = 1, S_PAD: tl.constexpr = 1,
    BLOCK_S: tl.constexpr = 1,
    APPEND: tl.constexpr = False, ROPE: tl.constexpr = False, MIN_PIECE: tl.constexpr = 0,
    PDL: tl.constexpr = False, LEN_OFFSET: tl.constexpr = 0,
    PREFETCH_TILES: tl.constexpr = 0, LINES: tl.constexpr = 1, LINE_ELEMS: tl.constexpr = 64,
    ROWS: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0, WINDOW: tl.constexpr = 0,
):
    # SOFTCAP > 0: scores capped (cap * tanh(s / cap), natural units, qk_scale = the plain
    # scale) before the softmax; WINDOW > 0: only keys j > seq_len - 1 - WINDOW (their range)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    if ROWS:   # move every per-row base pointer to row b; the rest of the kernel is unchanged
        row = tl.program_id(2).to(tl.int64)
        n_kv = tl.num_programs(0)
        q_ptr += row * stride_qb
        out_ptr += row * stride_ob
        kn_ptr += row * stride_knb
        vn_ptr += row * stride_vnb
        len_ptr += row
        # workspace rows b * n_q + head (as `combine_splits` reads an [B, n_q, hd] output)
        o_part_ptr += row * (GROUP * n_kv * HEAD_DIM)
        lse_part_ptr += row * (GROUP * n_kv)
        cnt_ptr += row * n_kv                 # one arrival counter per (row, kv head)
    if PREFETCH_TILES > 0:   # PDL only: an L2 hint for this piece's first blocks, pre-wait
        kc_pre = kc_ptr
        vc_pre = vc_ptr
        if ROWS:   # the slot as read before the wait, clamped into the cache: a hint only
            slot_pre = tl.minimum(tl.maximum(tl.load(slot_ptr + row).to(tl.int64), 0),
                                  n_slots - 1)
            kc_pre += slot_pre * stride_kcb
            vc_pre += slot_pre * stride_vcb
        _, _, _, lo0, hi0 = _piece_range(len_ptr, len_val, max_seq, split, LEN_FROM_PTR,
                                         LEN_OFFSET, APPEND, MIN_PIECE, NUM_SPLITS, BLOCK_N,
                                         WINDOW)
        _prefetch_piece(kc_pre + kvh * stride_kch, vc_pre + kvh * stride_vch, stride_kcs,
                        stride_vcs, lo0, hi0, PREFETCH_TILES, BLOCK_N, LINES, LINE_ELEMS)
    pdl_wait_then_release(PDL)   # q, k_new, v_new (and the length) come from earlier kernels
    if ROWS:   # int64: slot * stride_kcb passes 2^31 elements in a large cache
        slot = tl.load(slot_ptr + row).to(tl.int64)
        kc_ptr += slot * stride_kcb
        vc_ptr += slot * stride_vcb
    kc_base = kc_ptr + kvh * stride_kch
    vc_base = vc_ptr + kvh * stride_vch
    seq_len, n_cached, n_act, lo, hi = _piece_range(
        len_ptr, len_val, max_seq, split, LEN_FROM_PTR, LEN_OFFSET, APPEND, MIN_PIECE,
        NUM_SPLITS, BLOCK_N, WINDOW)
    live = split < n_act   # a program past n_act: no loads (q masked, empty key range)

    offs_h = tl.arange(0, BLOCK_H)                                      # [H] (>= 16 for tl.dot)
    h_ok = offs_h < GROUP
    head = kvh * GROUP + offs_h                                         # [H]
    offs_d = tl.arange(0, HEAD_DIM)                                     # [HD]
    q_ptrs = q_ptr + head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=h_ok[:, None] & live, other=0.0)
    if ROPE:   # rotate_half RoPE at the new token's position, fp32 math, rounded to the dtype
        pos = (seq_len - 1).to(tl.int64)
        c = tl.load(cos_ptr + pos * stride_tab + offs_d)                # [HD] fp32
        sn = tl.load(sin_ptr + pos * stride_tab + offs_d)
        offs_r = (offs_d + HEAD_DIM // 2) % HEAD_DIM                    # the other half
        sign = tl.where(offs_d < HEAD_DIM // 2, -1.0, 1.0)
        q_r = tl.load(q_ptrs + offs_r[None, :], mask=h_ok[:, None] & live,
                      other=0.0).to(tl.float32)
        q = round_to(q.to(tl.float32) * c[None, :] + sign[None, :] * q_r * sn[None, :],
                      q_ptr.dtype.element_ty)
    if FP32_DOT:
        q = q.to(tl.float32)                                            # [H, HD]

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)               # [H, HD]
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)                             # [N]
        n_ok = offs_n < hi
        kt = tl.load(kc_base + offs_n[None, :] * stride_kcs + offs_d[:, None],
                     mask=n_ok[None, :], other=0.0)                     # [HD, N] (K^T)
        v = tl.load(vc_base + offs_n[:, None] * stride_vcs + offs_d[None, :],
                    mask=n_ok[:, None], other=0.0)                      # [N, HD]
        if FP32_DOT:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = attn_scores(dot(q, kt, FP32_DOT), qk_scale, SOFTCAP)      # [H, N] log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, FP32_DOT)

    if APPEND:
        if split == 0:   # the new token: into the cache, and into this piece's softmax
            pos = (seq_len - 1).to(tl.int64)
            kn = tl.load(kn_ptr + kvh * stride_knh + offs_d)            # [HD]
            vn = tl.load(vn_ptr + kvh * stride_vnh + offs_d)
            if ROPE:
                kn_r = tl.load(kn_ptr + kvh * stride_knh + offs_r).to(tl.float32)
                kn = round_to(kn.to(tl.float32) * c + sign * kn_r * sn, kn_ptr.dtype.element_ty)
            tl.store(kc_base + pos * stride_kcs + offs_d, kn)
            tl.store(vc_base + pos * stride_vcs + offs_d, vn)
            s_new = attn_scores(tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1),
                                qk_scale, SOFTCAP)                      # [H]
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
            m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    else:   # a piece past the end (lo >= hi) stores lse = -inf, o = 0
        has = l_i > 0.0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # [H]
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        if FUSED:   # only the n_act live pieces store and arrive; the last one merges them
            if n_act == 1:   # a short context in one piece: its result is the output
                if live:
                    tl.store(out_ptr + head[:, None] * stride_oh + offs_d[None, :],
                             o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
            elif live:
                tl.store(o_part_ptr + split * stride_po + head[:, None] * HEAD_DIM
                         + offs_d[None, :], o, mask=h_ok[:, None])
                tl.store(lse_part_ptr + split * stride_pl + head, lse, mask=h_ok)
                # Every thread's partial stores happen before the (single-thread) release.
                tl.debug_barrier()
                count = tl.atomic_add(cnt_ptr + kvh, 1, sem="acq_rel", scope="gpu")  # old
                if count == n_act - 1:   # last piece of this kv head: all others are visible
                    _combine_group(o_part_ptr, lse_part_ptr, out_ptr, kvh, n_act, stride_oh,
                                   stride_po, stride_pl, GROUP, G_PAD, HEAD_DIM, S_PAD,
                                   BLOCK_S)
                    tl.atomic_xchg(cnt_ptr + kvh, 0, sem="relaxed", scope="gpu")  # reusable
        else:       # the combine kernel reads all NUM_SPLITS pieces
            tl.store(o_part_ptr + split * stride_po + head[:, None] * HEAD_DIM + offs_d[None, :],
                     o, mask=h_ok[:, None])
            tl.store(lse_part_ptr + split * stride_pl + head, lse, mask=h_ok)


@triton.jit
def _attention_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, n_rows, n_heads, stride_ol, stride_oh, stride_po, stride_pl,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Merge the split results of BLOCK_ROWS rows (row = token * n_heads + head).

    o_part [S, rows, HD] fp32 (normalised per piece), lse_part [S, rows] fp32 (log2 units).
    The tile is [S, BLOCK_ROWS * HD]; each column looks up its row's lse (a cached gather).
    """
    offs_s = tl.arange(0, BLOCK_S)                                      # [S]
    cols = tl.program_id(0) * (BLOCK_ROWS * HEAD_DIM) + tl.arange(0, BLOCK_ROWS * HEAD_DIM)  # [C]
    row = cols // HEAD_DIM                                              # [C]
    ok = (offs_s[:, None] < NUM_SPLITS) & (row < n_rows)[None, :]       # [S, C]
    lse = tl.load(lse_part_ptr + offs_s[:, None] * stride_pl + row[None, :], mask=ok,
                  other=float("-inf"))                                  # [S, C]
    m = tl.max(lse, 0)                                                  # [C]
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m[None, :])                                       # [S, C]; empty pieces -> 0
    o = tl.load(o_part_ptr + offs_s[:, None] * stride_po + cols[None, :], mask=ok, other=0.0)
    w_sum = tl.sum(w, 0)                                                # [C]
    o = tl.sum(o * w, 0) / tl.where(w_sum > 0.0, w_sum, 1.0)            # [C]
    tok = row // n_heads
    h = row % n_heads
    tl.store(out_ptr + tok * stride_ol + h * stride_oh + cols % HEAD_DIM,
             o.to(out_ptr.dtype.element_ty), mask=row < n_rows)


def combine_splits(o_part, lse_part, out, n_heads: int) -> None:
    """Stage 2: out[tok, head] = merge over pieces of o_part[:, tok * n_heads + head].

    o_part [S, rows, hd] fp32, lse_part [S, rows] fp32, out [L, n_heads, hd] or [n_heads, hd].
    """
    num_splits, n_rows, hd = o_part.shape
    block_s = triton.next_power_of_2(num_splits)
    # GPU: ~8K fp32 elements per tile; interpreter: big tiles (it pays per op, not per element).
    budget = 8192 if o_part.device.type == "cuda" else 1 << 17
    block_rows = min(triton.next_power_of_2(n_rows), max(1, budget // (block_s * hd)))
    stride_ol = out.stride(0) if out.dim() == 3 else 0
    _attention_combine_kernel[(triton.cdiv(n_rows, block_rows),)](
        o_part, lse_part, out, n_rows, n_heads, stride_ol, out.stride(-2),
        o_part.stride(0), lse_part.stride(0),
        NUM_SPLITS=num_splits, BLOCK_S=block_s, HEAD_DIM=hd, BLOCK_ROWS=block_rows,
        num_warps=4,
    )


def default_num_splits(n_kv: int, max_len: int, block_n: int, device: torch.device) -> int:
    """About 2 programs per SM, >= 1 key block each.

    NOTE: measured on an H200 (2026-11-27, Llama-3.1-8B GQA, bf16, block_n=64, 3 stages):
    33 splits beat 66 at every context (8k: 19.8 vs 33.9 us; 32k: 43.8 vs 61.7 us), since
    fewer, longer programs amortise the per-program q load and partial-result write."""
    if device.type != "cuda":
        return min(4, triton.cdiv(max_len, block_n))
    sms = num_sms(device)
    n = max(1, min(triton.cdiv(2 * sms, n_kv), triton.cdiv(max_len, block_n), 128))
    return 1 << (n.bit_length() - 1)    # a power of two: no padding in the combine tile


def decode_attention(q, k_cache, v_cache, seq_len, out=None, *, num_splits=None,
                     block_n=None, num_warps=None, num_stages=None,
                     fused_combine: bool | None = None, min_piece: int | None = None,
                     k_new=None, v_new=None, cos=None, sin=None, pdl: bool | None = False,
                     seq_len_offset: int = 0, prefetch_tiles: int | None = None,
                     scale: float | None = None, softcap: float | None = None,
                     window: int | None = None):
    """Attention of one query token over cache positions [0, seq_len).

    Gemma-2 options: scale (None: head_dim ** -0.5) multiplies q.k; softcap (None: off)
    caps the scaled scores, softcap * tanh(s / softcap), before the softmax; window (None:
    off) makes only keys j > seq_len - 1 - window visible (the blocks below are not read).

    q [n_q, hd]; k_cache/v_cache [n_kv, max_seq, hd] (same dtype as q, stride(-1) == 1);
    seq_len: int or 1-element int32/int64 tensor on q's device (read in the kernel, clamped
    to max_seq; no host sync). num_splits: fixed piece count (default: ~2 programs per SM,
    capped by the blocks in max_seq, or in seq_len when it is an int). fused_combine: merge
    the pieces inside the same launch (last-arriving program per kv head, see
    `split_counters`) instead of a second kernel; None = FUSED_COMBINE_DEFAULT; ignored when
    num_splits == 1. min_piece: use only as many pieces as give each >= min_piece keys at the
    length read (at least 1, at most num_splits; 0 = all num_splits); None =
    MIN_PIECE_DEFAULT. seq_len_offset: the length used is seq_len + seq_len_offset (a decode
    step passes its position tensor and 1: no kernel to add them). pdl: programmatic
    dependent launch (`pdl.py`; None = PDL_DEFAULT; a no-op off sm_90+ CUDA); with it,
    prefetch_tiles key blocks per piece are asked of L2 before the wait (None = 2).
    Returns out [n_q, hd] in q's dtype (written into `out` when given).

    Without k_new: q is already rotated and the current token's K/V are in the cache.
    Append mode, k_new/v_new [n_kv, hd] given: the current token (position seq_len - 1) is
    written into the cache by this launch; with cos/sin ([>= max_seq, hd] fp32 RoPE tables)
    q and k_new are unrotated and rotated here (RoPE + cache write + attention: one launch).
    """
    if (isinstance(seq_len_offset, bool) or not isinstance(seq_len_offset, int)
            or seq_len_offset < 0):
        raise ValueError(f"decode_attention: seq_len_offset must be an int >= 0, got "
                         f"{seq_len_offset!r}")
    if seq_len_offset and not isinstance(seq_len, torch.Tensor):
        seq_len, seq_len_offset = int(seq_len) + seq_len_offset, 0
    n_q, hd, n_kv, max_seq = _validate(q, k_cache, v_cache, seq_len, out)
    append = k_new is not None or v_new is not None
    rope = cos is not None or sin is not None
    if append or rope:
        _validate_append(q, k_cache, k_new, v_new, cos, sin, rope)
    if out is None:
        out = torch.empty((n_q, hd), dtype=q.dtype, device=q.device)   # [n_q, hd]
    len_is_tensor = isinstance(seq_len, torch.Tensor)
    block_n = 64 if block_n is None else block_n
    if num_splits is None:
        max_len = max_seq if len_is_tensor else max(1, int(seq_len))
        num_splits = default_num_splits(n_kv, max_len, block_n, q.device)
    _launch("decode_attention", q, k_cache, v_cache, out, 1,
            seq_len if len_is_tensor else None, 0 if len_is_tensor else int(seq_len),
            seq_len_offset, k_new if append else None, v_new if append else None,
            cos if rope else None, sin if rope else None, None,
            num_splits=num_splits, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, fused_combine=fused_combine, min_piece=min_piece,
            pdl=pdl, prefetch_tiles=prefetch_tiles,
            attn=attn_params("decode_attention", hd, scale, softcap, window))
    return out


def decode_attention_rows(q, k_cache, v_cache, slots, positions, k_new, v_new, cos, sin,
                          out=None, *, max_len: int | None = None, pdl: bool | None = None,
                          num_splits=None, block_n=None, num_warps=None, num_stages=None,
                          fused_combine: bool | None = None, min_piece: int | None = None,
                          prefetch_tiles: int | None = None, scale: float | None = None,
                          softcap: float | None = None, window: int | None = None):
    """Batched decode step: one new token per row, each row in its own cache slot.
    scale / softcap / window: as `decode_attention` (row b sees keys
    (positions[b] - window, positions[b]]).

    q [B, n_q, hd] and k_new / v_new [B, n_kv, hd] unrotated (any strides with
    stride(-1) == 1, e.g. views of a fused qkv projection); k_cache / v_cache
    [n_slots, n_kv, max_seq, hd] (model dtype, stride(-1) == 1); slots [B] int32/int64 on
    q's device: row b's cache slot (distinct per row: row b writes its slot); positions [B]
    int32/int64 on q's device: the position of row b's new token; cos / sin [>= max_seq, hd]
    fp32 RoPE tables (rotate-half layout). Per row: RoPE q and k_new at positions[b], write
    the rotated k and v at (slots[b], positions[b]), attend over slot positions
    [0, positions[b]] -- one launch (plus the combine kernel when fused_combine=False).
    slots / positions are read only in the kernel (no host sync, CUDA-graph capturable; a
    position >= max_seq is clamped to max_seq - 1, a slot is not range-checked).
    max_len: a host bound on positions[b] + 1 over the rows (only sizes the default piece
    count; None = max_seq). The other keywords are `decode_attention`'s; the fused combine
    uses one counter per (row, kv head): `split_counters(device, B * n_kv)`, so make one call
    per batch size before a CUDA-graph capture. pdl: None = PDL_DEFAULT.
    Returns out [B, n_q, hd] in q's dtype (written into `out` when given).
    """
    fn = "decode_attention_rows"
    check_ranks(fn, (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                     ("k_new", k_new, 3), ("v_new", v_new, 3), ("cos", cos, 2), ("sin", sin, 2)))
    B, n_q, hd = q.shape
    n_kv, max_seq = check_cache_heads(fn, n_q, hd, k_cache, v_cache)
    n_slots = k_cache.shape[0]
    check_dtype_device(fn, q, {"k_cache": k_cache, "v_cache": v_cache, "k_new": k_new,
                               "v_new": v_new}, {"cos": cos, "sin": sin})
    if not 1 <= B <= min(n_slots, 65535):   # 65535: the grid's third axis
        raise ValueError(f"{fn}: {B} rows for {n_slots} cache slots (need 1 <= B <= "
                         f"min(n_slots, 65535))")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (B, n_kv, hd):
            raise ValueError(f"{fn}: {name} {tuple(t.shape)} must be [B, n_kv, hd] = "
                             f"{(B, n_kv, hd)}")
    check_rope_tables(fn, cos, sin, max_seq, hd, q.device)
    check_row_vector(fn, "slots", slots, B, q.device)
    check_row_vector(fn, "positions", positions, B, q.device)
    if out is None:
        out = torch.empty((B, n_q, hd), dtype=q.dtype, device=q.device)   # [B, n_q, hd]
    elif (out.shape != (B, n_q, hd) or out.dtype != q.dtype or out.device != q.device
          or out.stride(-1) != 1):
        raise ValueError(f"{fn}: out must be {(B, n_q, hd)} {q.dtype} on {q.device} with unit "
                         f"last-dim stride, got {tuple(out.shape)} {out.dtype}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                or max_len < 1):
        raise ValueError(f"{fn}: max_len must be an int >= 1 or None, got {max_len!r}")
    block_n = 64 if block_n is None else block_n
    if num_splits is None:   # B * n_kv programs per piece share the SMs
        num_splits = default_num_splits(B * n_kv, min(max_len or max_seq, max_seq), block_n,
                                        q.device)
    _launch(fn, q, k_cache, v_cache, out, B, positions, 0, 1, k_new, v_new, cos, sin, slots,
            num_splits=num_splits, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, fused_combine=fused_combine, min_piece=min_piece,
            pdl=pdl, prefetch_tiles=prefetch_tiles,
            attn=attn_params(fn, hd, scale, softcap, window))
    return out


def _launch(fn, q, k_cache, v_cache, out, n_rows, len_t, len_val, len_offset, k_new, v_new,
            cos, sin, slots, *, num_splits, block_n, num_warps, num_stages, fused_combine,
            min_piece, pdl, prefetch_tiles, attn=None):
    """Launch `_decode_attention_kernel` on validated inputs: one sequence (slots None; q
    [n_q, hd], cache [n_kv, S, hd]) or n_rows rows (q [B, n_q, hd], cache [n_slots, n_kv, S,
    hd], len_t = the positions tensor). len_t: the length tensor (None: len_val is it)."""
    rows = slots is not None
    n_q, hd = q.shape[-2], q.shape[-1]
    n_kv, max_seq = k_cache.shape[-3], k_cache.shape[-2]
    group = n_q // n_kv
    qk_scale, softcap, window = attn if attn is not None else attn_params(fn, hd, None, None,
                                                                          None)
    gemma = attn_constexprs(softcap, window)
    on_gpu = q.device.type == "cuda"
    if fused_combine is None:
        fused_combine = FUSED_COMBINE_DEFAULT
    if num_splits < 1:
        raise ValueError(f"{fn}: num_splits must be >= 1, got {num_splits}")
    if min_piece is None:
        min_piece = MIN_PIECE_DEFAULT
    if isinstance(min_piece, bool) or not isinstance(min_piece, int) or min_piece < 0:
        raise ValueError(f"{fn}: min_piece must be an int >= 0 (0 = every piece), "
                         f"got {min_piece!r}")
    pdl = use_pdl(pdl, q.device)
    if prefetch_tiles is None:
        prefetch_tiles = 2
    if isinstance(prefetch_tiles, bool) or not isinstance(prefetch_tiles, int) \
            or prefetch_tiles < 0:
        raise ValueError(f"{fn}: prefetch_tiles must be an int >= 0, got {prefetch_tiles!r}")
    line_elems = 128 // q.element_size()                  # elements per 128-byte line
    if num_warps is None:
        num_warps = 4
    if num_stages is None:   # sm_90 compile, bf16, hd=128, 64 keys: 70 KB smem, 89 regs
        num_stages = 3 if q.dtype != torch.float32 else 2
    fused = bool(fused_combine) and num_splits > 1
    if num_splits > 1:   # rows b * n_q + head: what combine_splits reads for [B, n_q, hd]
        o_part = torch.empty((num_splits, n_rows * n_q, hd), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((num_splits, n_rows * n_q), dtype=torch.float32,
                               device=q.device)
    else:
        o_part = lse_part = out   # unused
    fused_meta = {}
    if fused:
        cnt = split_counters(q.device, n_rows * n_kv)   # [(row,) kv head]
        g_pad = triton.next_power_of_2(group)
        s_pad = triton.next_power_of_2(num_splits)
        # merge tile [BLOCK_S, G_PAD, hd] fp32: ~8K elements on a GPU (registers of the last
        # program); the interpreter pays per op, so one big tile there.
        budget = 8192 if on_gpu else 1 << 17
        fused_meta = dict(FUSED=True, G_PAD=g_pad, S_PAD=s_pad,
                          BLOCK_S=max(1, min(s_pad, budget // (g_pad * hd))))
    else:
        cnt = q   # unused
    append = k_new is not None
    rope = cos is not None
    kn, vn = (k_new, v_new) if append else (q, q)                      # unused unless append
    tc, ts = (cos, sin) if rope else (o_part, o_part)                  # unused unless rope
    if rows:
        row_args = (slots, k_cache.shape[0], q.stride(0), out.stride(0), kn.stride(0),
                    vn.stride(0), k_cache.stride(0), v_cache.stride(0))
    else:
        row_args = (q, 1, 0, 0, 0, 0, 0, 0)                             # unused
    _decode_attention_kernel[(n_kv, num_splits, n_rows)](
        q, k_cache, v_cache, out, o_part, lse_part,
        len_t if len_t is not None else q, cnt, len_val, max_seq,
        qk_scale,
        q.stride(-2), k_cache.stride(-3), k_cache.stride(-2), v_cache.stride(-3),
        v_cache.stride(-2), out.stride(-2), n_rows * n_q * hd, n_rows * n_q,
        kn, vn, kn.stride(-2), vn.stride(-2), tc, ts, tc.stride(0) if rope else 0,
        *row_args,
        APPEND=append, ROPE=rope, MIN_PIECE=min_piece if num_splits > 1 else 0,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, LEN_FROM_PTR=len_t is not None,
        FP32_DOT=(q.dtype == torch.float32 or not on_gpu),   # interpreter: no bf16 dots
        num_warps=num_warps, num_stages=num_stages, PDL=pdl, launch_pdl=pdl,
        LEN_OFFSET=len_offset, PREFETCH_TILES=prefetch_tiles if pdl else 0,
        LINES=triton.cdiv(hd, line_elems), LINE_ELEMS=line_elems, ROWS=rows, **fused_meta,
        **gemma,
    )
    if num_splits > 1 and not fused:
        combine_splits(o_part, lse_part, out, n_q)


def _validate(q, k_cache, v_cache, seq_len, out):
    check_ranks("decode_attention", (("q", q, 2), ("k_cache", k_cache, 3),
                                      ("v_cache", v_cache, 3)))
    n_q, hd = q.shape
    n_kv, max_seq = check_cache_heads("decode_attention", n_q, hd, k_cache, v_cache)
    check_dtype_device("decode_attention", q, {"k_cache": k_cache, "v_cache": v_cache}, {})
    if isinstance(seq_len, torch.Tensor):
        check_device_scalar("decode_attention", "seq_len", seq_len, q.device)
    elif not 1 <= int(seq_len) <= max_seq:
        raise ValueError(f"decode_attention: seq_len={seq_len} must be in [1, {max_seq}]")
    if out is not None and (out.shape != (n_q, hd) or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"decode_attention: out must be {(n_q, hd)} {q.dtype} on {q.device} "
                         f"with unit last-dim stride, got {tuple(out.shape)} {out.dtype}")
    return n_q, hd, n_kv, max_seq


def _validate_append(q, k_cache, k_new, v_new, cos, sin, rope):
    n_kv, hd = k_cache.shape[0], k_cache.shape[2]
    if k_new is None or v_new is None:
        raise ValueError("decode_attention: append mode needs both k_new and v_new")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if (not isinstance(t, torch.Tensor) or t.shape != (n_kv, hd) or t.dtype != q.dtype
                or t.device != q.device or t.stride(-1) != 1):
            raise ValueError(f"decode_attention: {name} must be [{n_kv}, {hd}] {q.dtype} on "
                             f"{q.device} with a unit last-dim stride, got "
                             f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if rope:
        if cos is None or sin is None:
            raise ValueError("decode_attention: RoPE needs both cos and sin")
        for name, t in (("cos", cos), ("sin", sin)):
            if (t.dim() != 2 or t.shape[0] < k_cache.shape[1] or t.shape[1] != hd
                    or t.dtype != torch.float32 or t.device != q.device
                    or not t.is_contiguous()):
                raise ValueError(f"decode_attention: {name} must be a contiguous fp32 "
                                 f"[>= {k_cache.shape[1]}, {hd}] table on {q.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")


def decode_attention_ref(q, k_cache, v_cache, seq_len, out=None, *, scale=None, softcap=None,
                         window=None):
    """Pure torch: SDPA (fp32) of q [n_q, hd] over cache positions [0, seq_len); with
    scale / softcap / window (`decode_attention`'s): explicit fp32 scores, capped, keys
    j > seq_len - 1 - window, fp32 softmax."""
    n_q, hd = q.shape
    n_kv = k_cache.shape[0]
    n = int(seq_len.item()) if isinstance(seq_len, torch.Tensor) else int(seq_len)
    keys = k_cache[:, :n].float().repeat_interleave(n_q // n_kv, dim=0)   # [n_q, n, hd]
    vals = v_cache[:, :n].float().repeat_interleave(n_q // n_kv, dim=0)
    if scale is None and softcap is None and window is None:
        o = torch.nn.functional.scaled_dot_product_attention(
            q.float()[:, None, :], keys, vals)                          # [n_q, 1, hd]
    else:
        s = attn_scores_ref(q.float()[:, None, :], keys,
                            hd ** -0.5 if scale is None else scale, softcap)   # [n_q, 1, n]
        if window is not None:
            s = s.masked_fill(torch.arange(n, device=q.device) <= n - 1 - window,
                              float("-inf"))
        o = torch.softmax(s, -1) @ vals                                 # [n_q, 1, hd]
    o = o[:, 0].to(q.dtype)                                             # [n_q, hd]
    if out is not None:
        out.copy_(o)
        return out
    return o


def decode_attention_rows_ref(q, k_cache, v_cache, slots, positions, k_new, v_new, cos, sin,
                              out=None, *, scale=None, softcap=None, window=None):
    """Pure torch, all rows at once: fp32 RoPE of q / k_new at positions[b] (cast to the
    model dtype, as the kernel rounds them), k / v written at (slots[b], positions[b]) in
    place, then masked SDPA (fp32) of each row over its slot's positions [0, positions[b]].
    Shapes as `decode_attention_rows`; returns [B, n_q, hd] in q's dtype."""
    return token_attention_ref(q, k_new, v_new, k_cache, v_cache, cos, sin, slots, positions,
                               out, scale, softcap, window)

