"""Fused WSD switch scoring: lm_head + log-softmax + rolling window + first switch.

For the c draft tokens of one chunk the base model's final-normed hidden states are scored
against the lm_head in one pass over the weight:

    logits[j] = hidden[j] @ weight.T                      (fp32, never written to memory)
    logp[j]   = logits[j, draft_ids[j]] - logsumexp(logits[j])
    mean[j]   = mean(log p of draft tokens i-w+1..i),  i = n_prev + j + 1, defined for i >= w
    first     = min{ j : mean[j] defined and mean[j] >= log_gamma }, else -1

Two launches, no host sync:
  1. `_switch_score_kernel`, grid (P,): program p owns vocab tiles [p*TILES, (p+1)*TILES) of
     BLOCK_V rows, reads each weight row once and scores all c positions against it with
     tl.dot (the c rows are padded to BLOCK_C >= 16; the vocab tile is the M side, "swap AB",
     because tl.dot needs every side >= 16 and c is ~8). Per program and row it keeps an
     online (max, sumexp), the best logit and its index, and the draft token's logit, and
     writes them to a [4, P, BLOCK_C] fp32 + [P, BLOCK_C] int32 workspace.
  2. `_switch_score_combine_kernel`, grid (1,): merges the P partials (lse, argmax, logp),
     then the rolling window over [carry, logp] and `first`.

Rows (`switch_score_rows`, a batch step): the T tokens of B requests ("rows", row b = token
rows cu_seqlens[b] .. cu_seqlens[b+1]-1) go through ONE scoring pass together -- the weight is
read once for all of them (token tiles of BLOCK_C, grid (P, n_ct) launched so that the
tiles of one vocab slice run back to back and share it through L2) -- then
`_switch_score_rows_combine_kernel`, grid (B,), merges each row's tokens and applies the
row's own window (w_b, n_prev_b, log_gamma_b, carry[b]: the last w_b - 1 log p's,
right-aligned in a [B, W-1] buffer) with the same window code as the single-row path.

Tensor parallelism (lm_head split by vocabulary rows over N ranks, rank r holding the
contiguous rows [v0_r, v1_r)): `switch_score_partials` runs the scoring pass on a rank's
shard (draft ids made local; ids of other shards match no row) and
`_switch_score_partials_merge_kernel` reduces its P programs to ONE partial per token
[4, T] fp32 + [T] int32 (global argmax index). The caller all_gathers those (a few floats a
token) and every rank runs `switch_window_rows_from_partials`: the rows combine kernel with
the N shards as its P programs (in vocab order, so "earlier program wins ties" is still the
lowest global index) -- the same decision as `switch_score_rows` on the full weight.

Exactness of the switch decision: the window sum is accumulated oldest to newest in fp32,
divided by w with round-to-nearest (tl.math.div_rn; plain fp32 `/` is approximate on
NVIDIA), and compared with log_gamma rounded to fp32. `switch_window_ref` does the same
operations in the same order, so on equal log p's the two agree bit for bit (and
`switch_window_rows_ref` for the rows kernel).

Precision of the logits: bf16/fp16 operands go to tl.dot as they are on a GPU (their
products are exact in fp32 and the accumulator is fp32, so this equals the fp32 reference
up to summation order); fp32 operands use input_precision="ieee" (no TF32). On CPU (Triton
interpreter, which computes bf16 dots wrongly) every operand is upcast to fp32 after loading.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_row_vector, soft_cap
from ._device import num_sms

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHUNK = 64


class SwitchScore(NamedTuple):
    """Outputs of `switch_score`, all on the input device."""

    logp: torch.Tensor    # [c] fp32  log p of draft_ids[j] at position j
    lse: torch.Tensor     # [c] fp32  logsumexp of the logits row
    argmax: torch.Tensor  # [c] int64 base greedy next token (lowest index on ties)
    mean: torch.Tensor    # [c] fp32  window mean of log p, NaN where the window is undefined
    first: torch.Tensor   # [1] int32 first j whose window passes, -1 if none


class SwitchScoreRows(NamedTuple):
    """Outputs of `switch_score_rows` (T tokens of B rows), all on the input device."""

    logp: torch.Tensor    # [T] fp32  log p of draft_ids[t]
    lse: torch.Tensor     # [T] fp32  logsumexp of the logits row (switch_window_rows: unset)
    argmax: torch.Tensor  # [T] int64 base greedy next token (switch_window_rows: unset)
    mean: torch.Tensor    # [T] fp32  window mean of its row, NaN where the window is undefined
    first: torch.Tensor   # [B] int64 first index j within row b's segment that passes, else -1


@triton.jit
def _switch_score_kernel(
    h_ptr, h_row_stride,      # [c, d]
    w_ptr, w_row_stride,      # [V, d]
    ids_ptr,                  # [c] int32/int64
    wsf_ptr,                  # [4, P, CT] fp32: max, sumexp, best logit, draft logit
    wsi_ptr,                  # [P, CT] int32: index of the best logit
    C, D, V, P,
    TILES_PER_PROG: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr = 0.0,
):
    # SOFTCAP > 0 (Gemma-2's final soft-cap): every logit is SOFTCAP * tanh(logit / SOFTCAP)
    # before the log-sum-exp, the argmax and the draft token's logit.
    # grid (P, n_ct): vocab slice pid x token tile ct (n_ct > 1 only in switch_score_rows,
    # for more tokens than one tile holds). Linearised so that the n_ct programs of one vocab
    # slice are launched back to back: the slice is read from HBM once, then from L2.
    n_ct = tl.num_programs(1)
    lin = tl.program_id(0) + tl.num_programs(0) * tl.program_id(1)
    pid = lin // n_ct
    offs_c = (lin % n_ct) * BLOCK_C + tl.arange(0, BLOCK_C)   # token rows of this tile
    CT = n_ct * BLOCK_C                                        # workspace [4, P, CT]
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    c_mask = offs_c < C
    ids = tl.load(ids_ptr + offs_c, mask=c_mask, other=-1).to(tl.int32)  # [BLOCK_C]

    m = tl.full([BLOCK_C], float("-inf"), tl.float32)       # running max
    s = tl.zeros([BLOCK_C], tl.float32)                     # running sum of exp(logit - m)
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)    # best logit so far
    best_i = tl.zeros([BLOCK_C], tl.int32)                  # its vocab index
    tgt = tl.zeros([BLOCK_C], tl.float32)                   # logit of the draft token

    for t in range(TILES_PER_PROG):
        v0 = (pid * TILES_PER_PROG + t) * BLOCK_V
        vs = v0 + offs_v                                    # [BLOCK_V]
        v_mask = vs < V
        w_rows = w_ptr + vs.to(tl.int64)[:, None] * w_row_stride
        acc = tl.zeros([BLOCK_V, BLOCK_C], tl.float32)      # logits^T of this tile
        for k0 in range(0, D, BLOCK_D):
            ds = k0 + offs_d
            d_mask = ds < D
            w = tl.load(w_rows + ds[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            h = tl.load(h_ptr + offs_c[:, None] * h_row_stride + ds[None, :],
                        mask=c_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)                        # [BLOCK_V, BLOCK_D]
                h = h.to(tl.float32)                        # [BLOCK_C, BLOCK_D]
            acc = tl.dot(w, tl.trans(h), acc, input_precision="ieee")
        if SOFTCAP > 0.0:
            acc = soft_cap(acc, SOFTCAP)
        logits = tl.where(v_mask[:, None], acc, float("-inf"))  # [BLOCK_V, BLOCK_C]
        tile_max = tl.max(logits, axis=0)                   # [BLOCK_C]
        tile_arg = tl.argmax(logits, axis=0)                # lowest index on ties
        new_m = tl.maximum(m, tile_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(logits - new_m[None, :]), axis=0)
        m = new_m
        better = tile_max > best                            # strict: earlier tile wins ties
        best_i = tl.where(better, v0 + tile_arg, best_i)
        best = tl.where(better, tile_max, best)
        tgt += tl.sum(tl.where(vs[:, None] == ids[None, :], acc, 0.0), axis=0)

    row = pid * CT + offs_c
    plane = P * CT
    tl.store(wsf_ptr + row, m)
    tl.store(wsf_ptr + plane + row, s)
    tl.store(wsf_ptr + 2 * plane + row, best)
    tl.store(wsf_ptr + 3 * plane + row, tgt)
    tl.store(wsi_ptr + row, best_i)


@triton.jit
def _merge_partials_raw(wsf_ptr, wsi_ptr, P, CT, tok, tok_mask, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """Merge the P partials of tokens `tok` [BLOCK_C] (workspace [4, P, CT] / [P, CT]) into
    one: returns (M, S, best, best_i, tgt) -- the max logit, the sum of exp(logit - M), the
    best logit, its index (int32, lowest on ties: earlier programs win) and the summed draft
    logit. Columns outside tok_mask read token 0's partials (in bounds; not to be stored)."""
    tok = tl.where(tok_mask, tok, 0)
    offs_p = tl.arange(0, BLOCK_P)
    plane = P * CT
    M = tl.full([BLOCK_C], float("-inf"), tl.float32)
    S = tl.zeros([BLOCK_C], tl.float32)
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_C], tl.int32)
    tgt = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + offs_p
        pm = (ps < P)[:, None]
        idx = ps[:, None] * CT + tok[None, :]                # [BLOCK_P, BLOCK_C]
        mp = tl.load(wsf_ptr + idx, mask=pm, other=float("-inf"))
        sp = tl.load(wsf_ptr + plane + idx, mask=pm, other=0.0)
        bv = tl.load(wsf_ptr + 2 * plane + idx, mask=pm, other=float("-inf"))
        tp = tl.load(wsf_ptr + 3 * plane + idx, mask=pm, other=0.0)
        bi = tl.load(wsi_ptr + idx, mask=pm, other=2147483647)
        new_M = tl.maximum(M, tl.max(mp, axis=0))
        S = S * tl.exp(M - new_M) + tl.sum(sp * tl.exp(mp - new_M[None, :]), axis=0)
        M = new_M
        cb = tl.max(bv, axis=0)
        ci = tl.min(tl.where(bv == cb[None, :], bi, 2147483647), axis=0)  # lowest index
        better = cb > best                                   # strict: earlier programs win ties
        best_i = tl.where(better, ci, best_i)
        best = tl.where(better, cb, best)
        tgt += tl.sum(tp, axis=0)
    return M, S, best, best_i, tgt


@triton.jit
def _merge_partials(wsf_ptr, wsi_ptr, P, CT, tok, tok_mask, BLOCK_C: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """`_merge_partials_raw`, finished: returns lse, argmax (int32, lowest index on ties) and
    logp = draft logit - lse."""
    M, S, best, best_i, tgt = _merge_partials_raw(wsf_ptr, wsi_ptr, P, CT, tok, tok_mask,
                                                  BLOCK_C, BLOCK_P)
    lse = M + tl.log(S)
    return lse, best_i, tgt - lse


@triton.jit
def _window_mean(carry_ptr, logp_ptr, j, j_mask, n_prev, window, window_f,
                 BLOCK_C: tl.constexpr, FP64: tl.constexpr):
    """Window means of positions j [BLOCK_C] of one sequence: ext = [carry (window-1 values,
    oldest first), logp (in memory)]; position j covers ext[j .. j+window-1], defined once
    n_prev + j + 1 >= window. Summed oldest to newest (as the refs do: a tree reduction
    could round differently), in fp32 divided by window_f with round-to-nearest, or with
    FP64 in float64 (carry float64, log p's widened exactly; IEEE division), the engine's
    rule. Returns (mean with NaN where undefined, defined)."""
    i = n_prev + j + 1                                       # 1-based draft index
    defined = j_mask & (i >= window)
    if FP64:
        acc = tl.zeros([BLOCK_C], tl.float64)
    else:
        acc = tl.zeros([BLOCK_C], tl.float32)
    e = j + 0                                                # index in ext of the k-th term
    for k in range(0, window):
        from_carry = e < window - 1
        cv = tl.load(carry_ptr + e, mask=j_mask & from_carry, other=0.0).to(acc.dtype)
        lv = tl.load(logp_ptr + (e - (window - 1)), mask=j_mask & (e >= window - 1),
                     other=0.0).to(acc.dtype)
        acc = acc + tl.where(from_carry, cv, lv)
        e += 1
    if FP64:
        mean = acc / window_f
    else:
        mean = tl.math.div_rn(acc, tl.zeros([BLOCK_C], tl.float32) + window_f)
    mean = tl.where(defined, mean, float("nan"))
    return mean, defined


@triton.jit
def _switch_score_combine_kernel(
    wsf_ptr, wsi_ptr, P,      # partials of _switch_score_kernel (unused when FROM_LOGP)
    logp_in_ptr,              # [c] fp32 given log p's (only when FROM_LOGP)
    carry_ptr,                # [window-1] fp32
    n_prev,                   # int, or pointer to a 1-element int tensor (N_PREV_IS_PTR)
    window, window_f, log_gamma, C,
    logp_ptr, lse_ptr, argmax_ptr, mean_ptr, first_ptr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    N_PREV_IS_PTR: tl.constexpr, FROM_LOGP: tl.constexpr,
):
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    if FROM_LOGP:
        logp = tl.load(logp_in_ptr + offs_c, mask=c_mask, other=0.0)
    else:
        lse, best_i, logp = _merge_partials(wsf_ptr, wsi_ptr, P, BLOCK_C, offs_c, c_mask,
                                            BLOCK_C, BLOCK_P)
        tl.store(lse_ptr + offs_c, lse, mask=c_mask)
        tl.store(argmax_ptr + offs_c, best_i.to(tl.int64), mask=c_mask)
    tl.store(logp_ptr + offs_c, logp, mask=c_mask)

    # Rolling window over ext = [carry (w-1 values), logp (c values)]: position j covers
    # ext[j .. j+w-1]. logp goes through memory (stored above; the barrier makes every
    # thread's store visible to the whole program) so its shifted copies can be gathered;
    # the terms are summed oldest first, exactly like switch_window_ref (a tree reduction
    # could round differently and flip a decision that sits on the threshold).
    tl.debug_barrier()
    if N_PREV_IS_PTR:
        n_prev_v = tl.load(n_prev).to(tl.int32)
    else:
        n_prev_v = n_prev
    mean, defined = _window_mean(carry_ptr, logp_ptr, offs_c, c_mask, n_prev_v, window,
                                 window_f, BLOCK_C, False)
    fire = defined & (mean >= log_gamma)
    first = tl.min(tl.where(fire, offs_c, BLOCK_C), axis=0)
    first = tl.where(first == BLOCK_C, -1, first)
    tl.store(mean_ptr + offs_c, mean, mask=c_mask)
    tl.store(first_ptr, first.to(tl.int32))


@triton.jit
def _switch_score_rows_combine_kernel(
    wsf_ptr, wsi_ptr, P, CT,  # partials [4, P, CT] / [P, CT] (unused when FROM_LOGP)
    logp_in_ptr,              # [T] fp32 given log p's (only when FROM_LOGP)
    cu_ptr,                   # [B+1] int: row b = tokens cu[b] .. cu[b+1]-1
    carry_ptr, stride_carry, W,   # [B, W-1] fp32 / fp64 (FP64), right-aligned (row b: its
    #                               last w_b-1)
    n_prev_ptr, window_ptr, log_gamma_ptr,   # [B] int, [B] int, [B] fp32 / fp64 (FP64)
    logp_ptr, lse_ptr, argmax_ptr, mean_ptr,   # [T]
    first_ptr,                # [B] int64
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FROM_LOGP: tl.constexpr,
    FP64: tl.constexpr,
):
    """One program per row: merge its tokens' partials (BLOCK_C at a time), then its own
    window rule (`_window_mean`, the single-sequence code on the row's carry and segment)."""
    b = tl.program_id(0)
    base = tl.load(cu_ptr + b).to(tl.int32)
    n = tl.load(cu_ptr + b + 1).to(tl.int32) - base          # tokens of this row
    w = tl.minimum(tl.maximum(tl.load(window_ptr + b).to(tl.int32), 1), W)  # clamped: no OOB
    if FP64:
        w_f = w.to(tl.float64)
    else:
        w_f = w.to(tl.float32)
    n_prev = tl.load(n_prev_ptr + b).to(tl.int32)
    lg = tl.load(log_gamma_ptr + b)
    carry_row = carry_ptr + b.to(tl.int64) * stride_carry + (W - w)   # its w-1, oldest first
    offs = tl.arange(0, BLOCK_C)
    first = n                                                # "none yet" (every hit is < n)
    for j0 in range(0, n, BLOCK_C):
        j = j0 + offs                                        # index within the segment
        j_mask = j < n
        tok = base + j                                       # token row
        if FROM_LOGP:
            logp = tl.load(logp_in_ptr + tok, mask=j_mask, other=0.0)
        else:
            lse, best_i, logp = _merge_partials(wsf_ptr, wsi_ptr, P, CT, tok, j_mask,
                                                BLOCK_C, BLOCK_P)
            tl.store(lse_ptr + tok, lse, mask=j_mask)
            tl.store(argmax_ptr + tok, best_i.to(tl.int64), mask=j_mask)
        tl.store(logp_ptr + tok, logp, mask=j_mask)
        # the window gathers shifted log p's (this block's and earlier ones') from memory:
        # every thread's stores above must be visible first
        tl.debug_barrier()
        mean, defined = _window_mean(carry_row, logp_ptr + base, j, j_mask, n_prev, w, w_f,
                                     BLOCK_C, FP64)
        fire = defined & (mean >= lg)
        first = tl.minimum(first, tl.min(tl.where(fire, j, n), axis=0))
        tl.store(mean_ptr + tok, mean, mask=j_mask)
    first = tl.where(first >= n, -1, first)
    tl.store(first_ptr + b, first.to(tl.int64))


@triton.jit
def _switch_score_partials_merge_kernel(
    wsf_ptr, wsi_ptr, P, CT,  # partials of _switch_score_kernel on one vocab shard
    T, vocab_offset,          # tokens; the shard's first global vocab row
    part_ptr,                 # [4, T] fp32: max, sumexp (relative to max), best, draft logit
    idx_ptr,                  # [T] int32: global index of the best logit
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_C),): the shard's P partials of each token merged into one
    (`_merge_partials_raw`), its argmax moved to the global vocabulary."""
    tok = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = tok < T
    M, S, best, best_i, tgt = _merge_partials_raw(wsf_ptr, wsi_ptr, P, CT, tok, t_mask,
                                                  BLOCK_C, BLOCK_P)
    tl.store(part_ptr + tok, M, mask=t_mask)
    tl.store(part_ptr + T + tok, S, mask=t_mask)
    tl.store(part_ptr + 2 * T + tok, best, mask=t_mask)
    tl.store(part_ptr + 3 * T + tok, tgt, mask=t_mask)
    tl.store(idx_ptr + tok, best_i + vocab_offset, mask=t_mask)


def _fp32(x: float) -> float:
    """Round a python float to the nearest fp32 (the kernel compares in fp32)."""
    return torch.tensor(float(x), dtype=torch.float32).item()


def _check_n_prev(n_prev, device):
    if isinstance(n_prev, torch.Tensor):
        if n_prev.numel() != 1 or n_prev.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"n_prev tensor must have 1 int32/int64 element, got shape "
                             f"{tuple(n_prev.shape)} dtype {n_prev.dtype}")
        if n_prev.device != device:
            raise ValueError(f"n_prev is on {n_prev.device}, hidden on {device}; move it")
        return True
    if isinstance(n_prev, bool) or not isinstance(n_prev, int) or n_prev < 0:
        raise ValueError(f"n_prev must be an int >= 0 or a 1-element int tensor, got {n_prev!r}")
    return False


def _check_window(carry, window, device, c):
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a python int >= 1, got {window!r}")
    if carry.dim() != 1 or carry.shape[0] != window - 1 or carry.dtype != torch.float32:
        raise ValueError(f"carry must be fp32 [window-1] = [{window - 1}], got "
                         f"{carry.dtype} {tuple(carry.shape)}")
    if carry.device != device or not carry.is_contiguous():
        raise ValueError(f"carry must be contiguous on {device}")
    if not 1 <= c <= MAX_CHUNK:
        raise ValueError(f"chunk size c must be in 1..{MAX_CHUNK}, got {c}")


def _alloc_out(c, device, out):
    if out is None:
        return SwitchScore(
            logp=torch.empty(c, device=device, dtype=torch.float32),
            lse=torch.empty(c, device=device, dtype=torch.float32),
            argmax=torch.empty(c, device=device, dtype=torch.int64),
            mean=torch.empty(c, device=device, dtype=torch.float32),
            first=torch.empty(1, device=device, dtype=torch.int32),
        )
    want = {"logp": ((c,), torch.float32), "lse": ((c,), torch.float32),
            "argmax": ((c,), torch.int64), "mean": ((c,), torch.float32),
            "first": ((1,), torch.int32)}
    for name, (shape, dtype) in want.items():
        t = getattr(out, name)
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(f"out.{name} must be a contiguous {dtype} {list(shape)} on {device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    return out


def _launch_combine(wsf, wsi, P, logp_in, carry, n_prev, window, log_gamma, c, out, block_p):
    BLOCK_C = max(16, triton.next_power_of_2(c))
    n_is_ptr = isinstance(n_prev, torch.Tensor)
    carry_arg = carry if window > 1 else out.logp  # never read when window == 1 (all masked)
    _switch_score_combine_kernel[(1,)](
        wsf, wsi, P, logp_in, carry_arg, n_prev, window, float(window), _fp32(log_gamma), c,
        out.logp, out.lse, out.argmax, out.mean, out.first,
        BLOCK_C=BLOCK_C, BLOCK_P=block_p, N_PREV_IS_PTR=n_is_ptr, FROM_LOGP=logp_in is not None,
        num_warps=4,
    )


def switch_score(hidden, weight, draft_ids, carry, n_prev, window, log_gamma, out=None, *,
                 block_v=None, block_d=None, tiles_per_prog=None, block_p=None,
                 num_warps=None, num_stages=None, softcap: float | None = None) -> SwitchScore:
    """Score a chunk of c draft tokens with the base lm_head and apply the WSD window rule.

    hidden [c, d] (c <= 64) and weight [V, d] share a float dtype and device; rows may be
    strided but the last dim must be contiguous. draft_ids [c] int32/int64. carry [window-1]
    fp32 holds the log p of the last window-1 scored draft tokens, oldest first (entries for
    tokens that do not exist are ignored). n_prev (python int or 1-element int tensor on the
    device, for CUDA graphs) is the number of draft tokens scored before this chunk.
    draft_ids are not range-checked (that would sync): an id outside [0, V) gives
    logp = -lse. `out` (a SwitchScore of preallocated tensors) is filled in place when given.
    Block sizes default per device (GPU: BLOCK_V=64, BLOCK_D=128, ~4 programs per SM).
    softcap (Gemma-2's final_softcap; None: off): logits are softcap * tanh(l / softcap)
    for the log-sum-exp, the argmax and the draft logit (logp = capped[t] - lse(capped)).
    No host sync. Returns a SwitchScore.
    """
    c, d, V = _check_hidden_weight(hidden, weight, draft_ids)
    device = hidden.device
    _check_window(carry, window, device, c)
    _check_n_prev(n_prev, device)
    out = _alloc_out(c, device, out)
    BLOCK_C = max(16, triton.next_power_of_2(c))
    wsf, wsi, P, block_p = _score_pass(hidden, weight, draft_ids, BLOCK_C, block_v, block_d,
                                       tiles_per_prog, block_p, num_warps, num_stages,
                                       _softcap(softcap))
    _launch_combine(wsf, wsi, P, None, carry, n_prev, window, log_gamma, c, out, block_p)
    return out


def _check_hidden_weight(hidden, weight, draft_ids) -> tuple[int, int, int]:
    """hidden [c, d] and weight [V, d] (one float dtype and device, unit last-dim stride),
    draft_ids [c] int32/int64 contiguous; returns (c, d, V)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES or t.stride(1) != 1:
            raise ValueError(f"{name} must be a 2-D fp32/bf16/fp16 tensor with a contiguous last "
                             f"dim, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    c, d = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != d or weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight {weight.dtype} {tuple(weight.shape)} on {weight.device} must be "
                         f"[V, {d}] {hidden.dtype} on {hidden.device} like hidden")
    device = hidden.device
    if (draft_ids.dim() != 1 or draft_ids.shape[0] != c or draft_ids.device != device
            or draft_ids.dtype not in (torch.int32, torch.int64) or not draft_ids.is_contiguous()):
        raise ValueError(f"draft_ids must be a contiguous int32/int64 [{c}] tensor on {device}, got "
                         f"{draft_ids.dtype} {tuple(draft_ids.shape)} on {draft_ids.device}")
    return c, d, V


def _softcap(softcap) -> float:
    """The SOFTCAP constexpr: 0.0 (off) for None, else the cap as a float > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"softcap must be a float > 0 or None, got {softcap!r}")
    return float(softcap)


def _score_pass(hidden, weight, draft_ids, BLOCK_C, block_v, block_d, tiles_per_prog,
                block_p, num_warps, num_stages, softcap=0.0):
    """Launch `_switch_score_kernel` over all c rows of hidden (cdiv(c, BLOCK_C) token
    tiles); returns its workspaces, P and the merge's BLOCK_P."""
    c, d = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    on_gpu = device.type == "cuda"
    if on_gpu:
        # bf16, 64x128 tiles, 4 stages: 80 KB of shared memory (16 B cp.async loads, wgmma
        # on sm_90, checked by compiling for sm_90; not yet timed). fp32 weights are a
        # test-only case: smaller tiles and 2 stages so they fit any GPU's shared memory.
        block_v = block_v or 64
        block_d = block_d or (64 if hidden.dtype == torch.float32 else 128)
        num_stages = num_stages or (2 if hidden.dtype == torch.float32 else 4)
    else:  # interpreter: few, large blocks
        block_v = block_v or min(4096, max(16, triton.next_power_of_2(V)))
        block_d = block_d or max(16, triton.next_power_of_2(d))
    for name, b in (("block_v", block_v), ("block_d", block_d)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {b}")
    if tiles_per_prog is not None and tiles_per_prog < 1:
        raise ValueError(f"tiles_per_prog must be >= 1, got {tiles_per_prog}")
    n_tiles = triton.cdiv(V, block_v)
    if tiles_per_prog is None:
        # GPU: ~4 programs per SM so the memory system stays busy; CPU: one program.
        target = 4 * num_sms(device) if on_gpu else 1
        tiles_per_prog = triton.cdiv(n_tiles, target)
    P = triton.cdiv(n_tiles, tiles_per_prog)
    n_ct = triton.cdiv(c, BLOCK_C)                     # token tiles (> 1: switch_score_rows)
    # merge tile: five [BLOCK_P, BLOCK_C] arrays in one program's registers; <= 4K elements
    # each (sm_90 compile: c = 64 with BLOCK_P 256 spilled 5.3 KB per thread, 64 does not)
    block_p = block_p or min(256, triton.next_power_of_2(P), max(16, 4096 // BLOCK_C))

    wsf = torch.empty(4, P, n_ct * BLOCK_C, device=device, dtype=torch.float32)
    wsi = torch.empty(P, n_ct * BLOCK_C, device=device, dtype=torch.int32)
    _switch_score_kernel[(P, n_ct)](
        hidden, hidden.stride(0), weight, weight.stride(0), draft_ids, wsf, wsi,
        c, d, V, P,
        TILES_PER_PROG=tiles_per_prog, BLOCK_C=BLOCK_C, BLOCK_V=block_v, BLOCK_D=block_d,
        UPCAST=(not on_gpu) or hidden.dtype == torch.float32,
        num_warps=num_warps or 4, num_stages=num_stages or 4,
        **({"SOFTCAP": softcap} if softcap else {}),   # default: today's kernel, unchanged
    )
    return wsf, wsi, P, block_p


def switch_window(logp, carry, n_prev, window, log_gamma, out=None) -> SwitchScore:
    """The window/threshold half of `switch_score` on given log p's [c] fp32 (same kernel).

    Returns a SwitchScore whose logp, mean and first are filled; lse and argmax are not
    written (left uninitialised).
    """
    if logp.dim() != 1 or logp.dtype != torch.float32 or not logp.is_contiguous():
        raise ValueError(f"logp must be a contiguous fp32 [c] tensor, got {logp.dtype} "
                         f"{tuple(logp.shape)}")
    c, device = logp.shape[0], logp.device
    _check_window(carry, window, device, c)
    _check_n_prev(n_prev, device)
    out = _alloc_out(c, device, out)
    _launch_combine(logp, logp, 1, logp, carry, n_prev, window, log_gamma, c, out, 16)
    return out


def _check_rows(device, T, cu_seqlens, carry, n_prev, window, log_gamma) -> tuple[int, int]:
    """The per-row arguments of switch_score_rows / switch_window_rows; returns (B, W)."""
    if T < 1:
        raise ValueError("switch_score_rows: no tokens (T == 0)")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
            or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be an int32/int64 [B+1] tensor (B >= 1) on {device}, "
                         f"got {getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    B = cu_seqlens.shape[0] - 1
    fn = "switch_score_rows"
    check_row_vector(fn, "cu_seqlens", cu_seqlens, B + 1, device)
    check_row_vector(fn, "n_prev", n_prev, B, device)
    check_row_vector(fn, "window", window, B, device)
    check_row_vector(fn, "log_gamma", log_gamma, B, device, (torch.float32, torch.float64))
    if (not isinstance(carry, torch.Tensor) or carry.dim() != 2 or carry.shape[0] != B
            or carry.dtype != log_gamma.dtype or carry.device != device
            or (carry.numel() and carry.stride(1) != 1)):
        raise ValueError(f"{fn}: carry must be a [B={B}, W-1] tensor of log_gamma's dtype "
                         f"({log_gamma.dtype}: fp32, or fp64 for the float64 rule) on {device} "
                         f"with a unit last-dim stride, got {getattr(carry, 'dtype', None)} "
                         f"{tuple(getattr(carry, 'shape', ()))}")
    return B, carry.shape[1] + 1


def _alloc_rows_out(T, B, device, out):
    want = {"logp": ((T,), torch.float32), "lse": ((T,), torch.float32),
            "argmax": ((T,), torch.int64), "mean": ((T,), torch.float32),
            "first": ((B,), torch.int64)}
    if out is None:
        return SwitchScoreRows(**{name: torch.empty(shape, device=device, dtype=dtype)
                                  for name, (shape, dtype) in want.items()})
    for name, (shape, dtype) in want.items():
        t = getattr(out, name)
        if (tuple(t.shape) != shape or t.dtype != dtype or t.device != device
                or not t.is_contiguous()):
            raise ValueError(f"out.{name} must be a contiguous {dtype} {list(shape)} on {device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    return out


def _rows_block_c(T: int, device, block_c) -> int:
    """Token tile of the scoring pass and each row's merge / window block. GPU: <= 64 (the
    c = 64 configs compiled for sm_90); interpreter: one block for up to 256 tokens."""
    if block_c is None:
        cap = 64 if device.type == "cuda" else 256
        block_c = min(cap, max(16, triton.next_power_of_2(T)))
    if block_c < 16 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two >= 16 (tl.dot), got {block_c}")
    return block_c


def _launch_rows_combine(wsf, wsi, P, CT, logp_in, cu_seqlens, carry, W, n_prev, window,
                         log_gamma, out, block_c, block_p):
    carry_arg = carry if carry.numel() else out.logp   # W == 1: never read (all masked)
    _switch_score_rows_combine_kernel[(cu_seqlens.shape[0] - 1,)](
        wsf, wsi, P, CT, logp_in, cu_seqlens, carry_arg, carry.stride(0) if carry.numel() else 0,
        W, n_prev, window, log_gamma, out.logp, out.lse, out.argmax, out.mean, out.first,
        BLOCK_C=block_c, BLOCK_P=block_p, FROM_LOGP=logp_in is not None,
        FP64=log_gamma.dtype == torch.float64, num_warps=4,
    )


def switch_score_rows(hidden, weight, draft_ids, cu_seqlens, carry, n_prev, window, log_gamma,
                      out=None, *, block_v=None, block_d=None, block_c=None,
                      tiles_per_prog=None, block_p=None, num_warps=None,
                      num_stages=None, softcap: float | None = None) -> SwitchScoreRows:
    """`switch_score` for B rows (requests) at once: one lm_head pass over the weight for all
    T tokens, then each row's own window rule.

    hidden [T, d] and weight [V, d] (one float dtype and device; unit last-dim stride);
    draft_ids [T] int32/int64. Row b owns token rows cu_seqlens[b] .. cu_seqlens[b+1]-1
    (cu_seqlens [B+1] int32/int64, cu_seqlens[0] = 0, cu_seqlens[B] = T, non-decreasing;
    any row length, 0 included). Per row, on the device: n_prev [B] int32/int64 (tokens
    the row scored before this chunk), window [B] int32/int64 (its w_b, 1 <= w_b <= W;
    values outside are clamped, not checked), log_gamma [B] fp32 (its threshold, already
    fp32: compared as is; or fp64, with carry fp64: the rule then runs in float64 — sums of
    the log p's widened exactly, IEEE division — equal bit for bit to the engine's
    `wsd_engine.switch.SwitchState` on the same log p's), carry [B, W-1] fp32 with W = the
    largest window any row may have:
    row b's last w_b - 1 scored log p's RIGHT-aligned, oldest first, i.e. carry[b, W-w_b:]
    is exactly `switch_score`'s carry of that row (entries for tokens that do not exist, and
    the W - w_b entries on the left, are ignored).
    Token j of row b (0-based in its segment) has window mean over the last w_b log p's
    (carried ones included), defined once n_prev[b] + j + 1 >= w_b; first[b] = the lowest j
    whose mean >= log_gamma[b], else -1 (decided in the kernel, bit-exact with
    `switch_window_rows_ref` on the same log p's). softcap: as `switch_score`. No host sync.
    Returns SwitchScoreRows: logp / lse / mean [T] fp32, argmax [T] int64, first [B] int64.
    """
    T, d, V = _check_hidden_weight(hidden, weight, draft_ids)
    device = hidden.device
    B, W = _check_rows(device, T, cu_seqlens, carry, n_prev, window, log_gamma)
    out = _alloc_rows_out(T, B, device, out)
    BLOCK_C = _rows_block_c(T, device, block_c)
    wsf, wsi, P, block_p = _score_pass(hidden, weight, draft_ids, BLOCK_C, block_v, block_d,
                                       tiles_per_prog, block_p, num_warps, num_stages,
                                       _softcap(softcap))
    _launch_rows_combine(wsf, wsi, P, wsf.shape[2], None, cu_seqlens, carry, W, n_prev, window,
                         log_gamma, out, BLOCK_C, block_p)
    return out


def switch_window_rows(logp, cu_seqlens, carry, n_prev, window, log_gamma, out=None, *,
                       block_c=None) -> SwitchScoreRows:
    """The window half of `switch_score_rows` on given log p's [T] fp32 (same kernel).
    Returns a SwitchScoreRows whose logp, mean and first are filled (lse, argmax are not)."""
    if logp.dim() != 1 or logp.dtype != torch.float32 or not logp.is_contiguous():
        raise ValueError(f"logp must be a contiguous fp32 [T] tensor, got {logp.dtype} "
                         f"{tuple(logp.shape)}")
    T, device = logp.shape[0], logp.device
    B, W = _check_rows(device, T, cu_seqlens, carry, n_prev, window, log_gamma)
    out = _alloc_rows_out(T, B, device, out)
    _launch_rows_combine(logp, logp, 1, 1, logp, cu_seqlens, carry, W, n_prev, window,
                         log_gamma, out, _rows_block_c(T, device, block_c), 16)
    return out


def _check_vocab_offset(vocab_offset, Vr: int) -> None:
    if isinstance(vocab_offset, bool) or not isinstance(vocab_offset, int) or vocab_offset < 0:
        raise ValueError(f"switch_score_partials: vocab_offset must be a python int >= 0, got "
                         f"{vocab_offset!r}")
    if Vr < 1:
        raise ValueError("switch_score_partials: the weight shard has no rows (Vr == 0)")
    if vocab_offset + Vr > 2 ** 31 - 1:
        raise ValueError(f"switch_score_partials: vocab_offset + Vr = {vocab_offset + Vr} does "
                         f"not fit the int32 indices")


def switch_score_partials(hidden, weight, draft_ids, vocab_offset: int, *,
                          softcap: float | None = None, block_v=None, block_d=None,
                          block_c=None, tiles_per_prog=None, num_warps=None,
                          num_stages=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring pass of `switch_score_rows` on one vocabulary shard (tensor parallelism).

    weight [Vr, d] holds global vocab rows [vocab_offset, vocab_offset + Vr) of the lm_head;
    hidden [T, d] and draft_ids [T] (GLOBAL ids, int32/int64) as in `switch_score_rows`.
    Returns (part, idx): part [4, T] fp32 -- per token the shard's max logit, the sum of
    exp(logit - max) over the shard, its best logit and the draft token's logit (0.0 where
    the id is outside the shard; soft-capped like every logit when softcap is given); idx
    [T] int32 -- the GLOBAL index of the shard's best logit (lowest on ties). Stack the N
    ranks' parts in rank (= vocab) order, [4, N, T] / [N, T], and give them to
    `switch_window_rows_from_partials`. Block sizes as `switch_score_rows`. No host sync.
    """
    T, d, Vr = _check_hidden_weight(hidden, weight, draft_ids)
    _check_vocab_offset(vocab_offset, Vr)
    if T < 1:
        raise ValueError("switch_score_partials: no tokens (T == 0)")
    device = hidden.device
    BLOCK_C = _rows_block_c(T, device, block_c)
    # local ids; ids of other shards match no row (-1) and are never used as an address
    local = draft_ids - vocab_offset
    local = torch.where((local >= 0) & (local < Vr), local, -1)
    wsf, wsi, P, block_p = _score_pass(hidden, weight, local, BLOCK_C, block_v, block_d,
                                       tiles_per_prog, None, num_warps, num_stages,
                                       _softcap(softcap))
    part = torch.empty(4, T, device=device, dtype=torch.float32)
    idx = torch.empty(T, device=device, dtype=torch.int32)
    _switch_score_partials_merge_kernel[(triton.cdiv(T, BLOCK_C),)](
        wsf, wsi, P, wsf.shape[2], T, vocab_offset, part, idx,
        BLOCK_C=BLOCK_C, BLOCK_P=block_p, num_warps=4,
    )
    return part, idx


def switch_window_rows_from_partials(parts, idxs, cu_seqlens, carry, n_prev, window,
                                     log_gamma, out=None, *, block_c=None) -> SwitchScoreRows:
    """The combine half of `switch_score_rows` on the N vocab shards' partials: parts
    [4, N, T] fp32 and idxs [N, T] int32, the `switch_score_partials` outputs of ranks
    0 .. N-1 stacked in rank order (shards contiguous and in vocab order), contiguous, on one
    device. The partials merge exactly as the scoring pass's P programs do (the shards are
    its programs: an earlier shard wins a tie, so argmax is the lowest global index), then
    each row's window rule; cu_seqlens, carry, n_prev, window, log_gamma and out as
    `switch_score_rows`. Returns a full SwitchScoreRows (logp, lse, argmax, mean, first).
    No host sync."""
    fn = "switch_window_rows_from_partials"
    if (not isinstance(parts, torch.Tensor) or parts.dim() != 3 or parts.shape[0] != 4
            or parts.shape[1] < 1 or parts.dtype != torch.float32
            or not parts.is_contiguous()):
        raise ValueError(f"{fn}: parts must be a contiguous fp32 [4, N, T] tensor (the N >= 1 "
                         f"ranks' switch_score_partials stacked), got "
                         f"{getattr(parts, 'dtype', type(parts).__name__)} "
                         f"{tuple(getattr(parts, 'shape', ()))}")
    N, T = parts.shape[1], parts.shape[2]
    device = parts.device
    if (not isinstance(idxs, torch.Tensor) or tuple(idxs.shape) != (N, T)
            or idxs.dtype != torch.int32 or idxs.device != device
            or not idxs.is_contiguous()):
        raise ValueError(f"{fn}: idxs must be a contiguous int32 [N, T] = [{N}, {T}] tensor on "
                         f"{device} (like parts), got {getattr(idxs, 'dtype', None)} "
                         f"{tuple(getattr(idxs, 'shape', ()))} on {getattr(idxs, 'device', None)}")
    B, W = _check_rows(device, T, cu_seqlens, carry, n_prev, window, log_gamma)
    out = _alloc_rows_out(T, B, device, out)
    BLOCK_C = _rows_block_c(T, device, block_c)
    block_p = min(256, triton.next_power_of_2(N), max(16, 4096 // BLOCK_C))
    # parts is the [4, P, CT] workspace with P = N programs and CT = T token columns
    _launch_rows_combine(parts, idxs, N, T, None, cu_seqlens, carry, W, n_prev, window,
                         log_gamma, out, BLOCK_C, block_p)
    return out


def switch_window_ref(logp, carry, n_prev, window, log_gamma):
    """Torch reference of the window rule: (mean [c] fp32 with NaN, first [1] int32).

    Sums oldest to newest in fp32, divides by w (correctly rounded) and compares with
    log_gamma rounded to fp32, exactly as the kernel does.
    """
    n_prev = int(n_prev)  # host sync on tensors: fine for a reference
    c = logp.shape[0]
    ext = torch.cat([carry.float().cpu(), logp.float().cpu()])  # [w-1+c]
    lg = torch.tensor(log_gamma, dtype=torch.float32)
    mean = torch.full((c,), float("nan"), dtype=torch.float32)
    first = -1
    for j in range(c):
        if n_prev + j + 1 < window:
            continue
        acc = ext[j].clone()
        for k in range(1, window):
            acc = acc + ext[j + k]
        mean[j] = acc / window
        if first < 0 and bool(mean[j] >= lg):
            first = j
    return mean.to(logp.device), torch.tensor([first], dtype=torch.int32, device=logp.device)


def switch_score_ref(hidden, weight, draft_ids, carry, n_prev, window, log_gamma, *,
                     softcap=None) -> SwitchScore:
    """Pure-torch reference: fp32 logits (soft-capped when softcap is given),
    torch.log_softmax, a plain window loop."""
    logits = _capped(hidden.float() @ weight.float().T, softcap)       # [c, V]
    logp = torch.log_softmax(logits, dim=-1).gather(1, draft_ids.long()[:, None])[:, 0]  # [c]
    lse = torch.logsumexp(logits, dim=-1)                               # [c]
    argmax = logits.argmax(dim=-1)                                      # [c]
    mean, first = switch_window_ref(logp, carry, n_prev, window, log_gamma)
    return SwitchScore(logp=logp, lse=lse, argmax=argmax, mean=mean, first=first)


def switch_window_rows_ref(logp, cu_seqlens, carry, n_prev, window, log_gamma):
    """Torch reference of the per-row window rule: (mean [T] fp32 with NaN, first [B] int64).

    All tokens at once: token t of row b gathers ext_b = [carry[b, W-w_b:], logp of row b]
    at [j, j + w_b) and sums those terms oldest to newest in fp32 (one vectorised add per
    term, a row's terms past its w_b left out), divides by w_b (correctly rounded) and
    compares with log_gamma[b] (fp32) -- the kernel's operations in the kernel's order.
    Windows are clamped to [1, W] as in the kernel.
    """
    dev = logp.device
    logp = logp.float().cpu()
    cu = cu_seqlens.long().cpu()
    carry = carry.float().cpu()
    B, W = carry.shape[0], carry.shape[1] + 1
    lens = cu[1:] - cu[:-1]                                             # [B]
    T = logp.shape[0]
    row = torch.repeat_interleave(torch.arange(B), lens)                # [T] row of each token
    j = torch.arange(T) - cu[:-1][row]                                  # [T] index in its row
    w = window.long().cpu().clamp(1, W)[row]                            # [T]
    lg = log_gamma.float().cpu()[row]
    defined = n_prev.long().cpu()[row] + j + 1 >= w
    # ext index e = j + k (k = 0 .. w-1): e < w-1 -> carry[b, W-w+e], else logp[cu[b] + e-(w-1)]
    acc = torch.zeros(T, dtype=torch.float32)
    for k in range(W):
        e = j + k
        use = k < w
        from_carry = e < w - 1
        cv = carry[row, (W - w + e).clamp(max=W - 2).clamp(min=0)] if W > 1 else torch.zeros(T)
        lv = logp[(cu[:-1][row] + e - (w - 1)).clamp(0, T - 1)]
        term = torch.where(from_carry, cv, lv)
        acc = torch.where(use, acc + term, acc)          # starts 0 + first term, as the kernel
    mean = torch.where(defined, acc / w.float(), torch.tensor(float("nan")))
    fire = defined & (mean >= lg)
    first = torch.full((B,), -1, dtype=torch.int64)
    for b in range(B):   # lowest firing j per row
        hit = torch.nonzero(fire[cu[b]:cu[b + 1]])
        if len(hit):
            first[b] = hit[0, 0]
    return mean.to(dev), first.to(dev)


def _capped(logits, softcap):
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def switch_score_rows_ref(hidden, weight, draft_ids, cu_seqlens, carry, n_prev, window,
                          log_gamma, *, softcap=None) -> SwitchScoreRows:
    """Pure-torch reference of `switch_score_rows`: fp32 logits of all T tokens (soft-capped
    when softcap is given), torch.log_softmax, then `switch_window_rows_ref`."""
    logits = _capped(hidden.float() @ weight.float().T, softcap)       # [T, V]
    logp = torch.log_softmax(logits, dim=-1).gather(1, draft_ids.long()[:, None])[:, 0]  # [T]
    lse = torch.logsumexp(logits, dim=-1)                               # [T]
    argmax = logits.argmax(dim=-1)                                      # [T]
    mean, first = switch_window_rows_ref(logp, cu_seqlens, carry, n_prev, window, log_gamma)
    return SwitchScoreRows(logp=logp, lse=lse, argmax=argmax, mean=mean, first=first)


def switch_score_partials_ref(hidden, weight, draft_ids, vocab_offset, softcap=None):
    """Pure-torch reference of `switch_score_partials`, in float64: (part [4, T] fp32,
    idx [T] int32) of the shard weight [Vr, d] = global rows [vocab_offset, vocab_offset+Vr)."""
    logits = _capped(hidden.double() @ weight.double().T, softcap)     # [T, Vr]
    Vr = weight.shape[0]
    m = logits.max(dim=-1).values                                       # [T]
    s = torch.exp(logits - m[:, None]).sum(dim=-1)                      # [T]
    best_i = logits.argmax(dim=-1)                                      # [T] lowest on ties
    best = logits.gather(1, best_i[:, None])[:, 0]
    local = draft_ids.long() - vocab_offset
    inside = (local >= 0) & (local < Vr)
    tgt = logits.gather(1, local.clamp(0, Vr - 1)[:, None])[:, 0]
    tgt = torch.where(inside, tgt, torch.zeros_like(tgt))
    part = torch.stack([m, s, best, tgt]).float()
    return part, (best_i + vocab_offset).to(torch.int32)


__all__ = ["SwitchScore", "switch_score", "switch_score_ref", "switch_window", "switch_window_ref",
           "SwitchScoreRows", "switch_score_rows", "switch_score_rows_ref", "switch_window_rows",
           "switch_window_rows_ref", "switch_score_partials", "switch_score_partials_ref",
           "switch_window_rows_from_partials",
           "MAX_CHUNK"]
