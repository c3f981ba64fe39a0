"""The transformer forward over (tokens, positions, cache), one implementation for Llama,
Mistral and Qwen2 (they differ only by config options: GQA, biases, tied embeddings, RoPE
scaling). Pure torch here; the "triton" backend swaps the layer operations for the kernels
in `wsd_engine.kernels`, the data flow stays the same.

Numerics follow Hugging Face transformers (RMSNorm in fp32 then cast, RoPE tables in fp32
cast to the model dtype, softmax in fp32), so fp32 logits agree to ~1e-5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import StaticKVCache
from .config import ModelConfig
from .rows import RowBatch


def rope_tables(cfg: ModelConfig, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, head_dim] fp32, rotate-half layout (freqs repeated twice)."""
    inv = cfg.rope.inv_freq(cfg.head_dim)                               # [hd/2]
    pos = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]                                 # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                             # [S, hd]
    return emb.cos().to(device), emb.sin().to(device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, hd]; cos/sin [T, hd] fp32 (cast to x's dtype, as transformers does)."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + _rotate_half(x) * sin


class TorchOps:
    """Pure-torch layer operations: the reference backend, runs anywhere."""

    name = "torch"

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def rms_norm(self, x, weight, residual=None):
        """Returns norm(x + residual) and the new residual stream (x + residual)."""
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, self.cfg.rms_norm_eps), x

    def attention(self, q, k, v, cache: StaticKVCache, layer: int, positions, cos, sin,
                  start: int):
        """q [T, nq, hd], k/v [T, nkv, hd] unrotated; new tokens at positions
        start..start+T-1. Writes K/V into the cache, returns [T, nq, hd]."""
        T = q.shape[0]
        c, s = cos[positions], sin[positions]                           # [T, hd]
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        kc, vc = cache.slot_k(layer), cache.slot_v(layer)               # [nkv, S, hd]
        kc[:, start:start + T] = k.transpose(0, 1)
        vc[:, start:start + T] = v.transpose(0, 1)
        end = start + T
        keys, vals = kc[:, :end], vc[:, :end]                           # [nkv, end, hd]
        # key j visible to the new token at position p iff j <= p (and j > p - window)
        pos = positions.reshape(-1)
        mask = self._visible(torch.arange(end, device=q.device)[None, :], pos[:, None], layer)
        out = self._attend(q.transpose(0, 1)[None], keys[None], vals[None],
                           mask[None, None])                            # [1, nq, T, hd]
        return out[0].transpose(0, 1)

    def _visible(self, key_pos, query_pos, layer: int):
        """Which keys a query sees: causal, and within the layer's window if it has one."""
        mask = key_pos <= query_pos
        window = self.cfg.layer_windows[layer] if self.cfg.layer_windows else None
        if window is not None:
            mask = mask & (key_pos > query_pos - window)
        return mask

    def _attend(self, q, keys, vals, mask):
        """q [B, nq, Tq, hd] over keys / vals [B, nkv, L, hd] with a bool mask
        [B, 1, Tq, L]. Gemma-2: its scale and score soft-cap, in transformers' eager
        order (scores in the model dtype, capped, masked, softmax in fp32); else SDPA."""
        cfg = self.cfg
        if not cfg.is_gemma2:
            return F.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask, enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        g = cfg.num_heads // cfg.num_kv_heads
        keys, vals = keys.repeat_interleave(g, dim=1), vals.repeat_interleave(g, dim=1)
        s = torch.matmul(q, keys.transpose(2, 3)) * cfg.attn_scale       # [B, nq, Tq, L]
        if cfg.attn_softcap is not None:
            s = torch.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, vals)

    def attention_rows(self, q, k, v, cache: StaticKVCache, layer: int, rb: RowBatch,
                       cos, sin):
        """Several rows at once: q [T, nq, hd], k/v [T, nkv, hd] unrotated, row b's tokens
        at rb's positions in its own cache slot. Writes K/V, returns [T, nq, hd].

        The rows are padded to [B, max_q] queries over [B, max_len] keys with a mask, so
        the whole batch is one attention call whatever the rows' lengths."""
        pos = rb.positions                                              # [T]
        c, s = cos[pos], sin[pos]
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        kc, vc = cache.k[layer], cache.v[layer]                         # [n_slots, nkv, S, hd]
        kc[rb.token_slots, :, pos] = k                                  # [T, nkv, hd] scattered
        vc[rb.token_slots, :, pos] = v
        L = rb.max_len
        keys, vals = kc[rb.slots, :, :L], vc[rb.slots, :, :L]          # [B, nkv, L, hd]
        nq, hd = q.shape[1], q.shape[2]
        qp = q.new_zeros(rb.n_rows, rb.max_q, nq, hd)                  # [B, Tq, nq, hd]
        qp[rb.token_rows, rb.token_index] = q
        # key j visible to query (b, i) iff j <= its position (padded queries: the row's
        # first position, any valid value; their outputs are dropped)
        mask = self._visible(torch.arange(L, device=q.device)[None, None, :],
                             rb.padded_positions[:, :, None], layer)   # [B, Tq, L]
        out = self._attend(qp.transpose(1, 2), keys, vals, mask[:, None])  # [B, nq, Tq, hd]
        return out.transpose(1, 2)[rb.token_rows, rb.token_index]      # [T, nq, hd]

    def swiglu(self, gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g) * u

    # ---- Gemma-2 -------------------------------------------------------------------------
    def gemma_norm(self, x, weight):
        """Gemma-2's RMSNorm: in fp32, times (1 + weight) in fp32, then cast."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return (h * (1.0 + weight.float())).to(x.dtype)

    def geglu_linear(self, gate_up, weight, bias=None):
        """down(gelu_tanh(gate) * up)."""
        g, u = gate_up.chunk(2, dim=-1)
        return F.linear(F.gelu(g, approximate="tanh") * u, weight, bias)

    # the matmuls with their neighbours; a backend may fuse each chain into one kernel
    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def norm_linear(self, x, residual, norm_weight, weight, bias=None, logits=False):
        """linear(rms_norm(x + residual)) and the new residual stream; logits=True widens
        the product to fp32 (the lm_head)."""
        h, residual = self.rms_norm(x, norm_weight, residual)
        y = F.linear(h, weight, bias)
        return (y.float() if logits else y), residual

    def swiglu_linear(self, gate_up, weight, bias=None):
        return F.linear(self.swiglu(gate_up), weight, bias)


def forward(cfg: ModelConfig, w: dict[str, torch.Tensor], ops, tokens: torch.Tensor,
            start: int, cache: StaticKVCache, cos: torch.Tensor, sin: torch.Tensor,
            return_hidden: bool = False, rows: slice | torch.Tensor | None = None,
            comm=None) -> torch.Tensor:
    """Run tokens [T] at positions start..start+T-1 of cache slot 0 against its positions
    [0, start).

    `start` is an int, or (triton backend, for CUDA-graph capture) a [1] int64 device
    tensor, in which case nothing here reads it on the host and the caller keeps
    cache.length. Writes the new K/V and sets cache.length = start + T (int start). Returns fp32
    logits [T', V], or the final-normed hidden states [T', d] when `return_hidden` (the WSD
    scoring kernel applies the lm_head itself), for the rows `rows`: all by default, a
    slice, or an int64 index tensor on the device (a graph-captured prefill picks the last
    prompt token's row through a static index buffer).

    `comm`: a tensor-parallel rank's collectives (`parallel.Collectives`): the weights are
    then this rank's shards (see `sharding`), the embedding is looked up in the rank's
    vocabulary rows and assembled by an all-reduce, each row-parallel matmul (o_proj,
    down_proj) is followed by one all-reduce, and the logits of the vocabulary shards are
    gathered (every rank gets all of them).
    """
    T = tokens.shape[0]
    host_start = not isinstance(start, torch.Tensor)
    if host_start:
        cache.check_fits(start, T)
        positions = torch.arange(start, start + T, device=tokens.device)    # [T]
    elif T == 1:
        positions = start                       # [1] device tensor: no kernel in a graph step
    else:
        positions = start + torch.arange(T, device=tokens.device)          # [T]

    def attend(q, k, v, layer):
        return ops.attention(q, k, v, cache, layer, positions, cos, sin, start)
    x, residual = _layers(cfg, w, ops, tokens, attend, comm)
    if host_start:
        cache.length = start + T
    return _head(w, ops, x, residual, rows, return_hidden, comm)


def forward_rows(cfg: ModelConfig, w: dict[str, torch.Tensor], ops, tokens: torch.Tensor,
                 rb: RowBatch, cache: StaticKVCache, cos: torch.Tensor, sin: torch.Tensor,
                 return_hidden: bool = False, rows: torch.Tensor | None = None,
                 comm=None) -> torch.Tensor:
    """Several rows in one forward: tokens [T] laid out as `rb` says (row b: its tokens at
    positions rb.starts[b].. of cache slot rb.slots[b], attending to that slot's positions
    before them). Writes K/V; the caller sets the slots' lengths. Returns fp32 logits
    [T', V] or final-normed hidden states [T', d] of the token rows `rows` (all: None)."""
    def attend(q, k, v, layer):
        return ops.attention_rows(q, k, v, cache, layer, rb, cos, sin)
    x, residual = _layers(cfg, w, ops, tokens, attend, comm)
    return _head(w, ops, x, residual, rows, return_hidden, comm)


def _embed(tokens, weight, comm):
    return F.embedding(tokens, weight) if comm is None else comm.embed(tokens, weight)


def _reduce(x, comm):
    """The sum over tensor-parallel ranks of a row-parallel matmul's partial output."""
    return x if comm is None else comm.all_reduce(x)


def _layers(cfg: ModelConfig, w: dict, ops, tokens: torch.Tensor, attend, comm=None):
    """Embedding and the decoder layers; attention through `attend(q, k, v, layer)`.
    Returns the last layer's output and the residual stream (not yet added)."""
    if cfg.is_gemma2:
        return _gemma2_layers(cfg, w, ops, tokens, attend, comm), None
    T = tokens.shape[0]
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = _embed(tokens, w["embed"], comm)                                # [T, d]
    residual = None
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        qkv, residual = ops.norm_linear(x, residual, w[p + "attn_norm"], w[p + "qkv"],
                                        w.get(p + "qkv_bias"))          # [T, (nq+2nkv)*hd]
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        attn = attend(q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd), layer)
        x = _reduce(ops.linear(attn.reshape(T, nq * hd), w[p + "o"], w.get(p + "o_bias")),
                    comm)                                               # [T, d]
        gu, residual = ops.norm_linear(x, residual, w[p + "mlp_norm"], w[p + "gate_up"],
                                       w.get(p + "gate_up_bias"))      # [T, 2I]
        x = _reduce(ops.swiglu_linear(gu, w[p + "down"], w.get(p + "down_bias")),
                    comm)                                               # [T, d]
    return x, residual


def _gemma2_layers(cfg: ModelConfig, w: dict, ops, tokens: torch.Tensor, attend, comm=None):
    """Gemma-2's layers: the embedding times sqrt(hidden) (in the model dtype), and per
    layer x += post_norm(attn(norm(x))), x += post_norm(mlp(norm(x))), GeGLU MLP."""
    T = tokens.shape[0]
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    emb = w["embed"]
    x = _embed(tokens, emb, comm) * torch.tensor(cfg.embed_scale, dtype=emb.dtype)  # [T, d]
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        qkv = ops.linear(ops.gemma_norm(x, w[p + "attn_norm"]), w[p + "qkv"],
                         w.get(p + "qkv_bias"))                        # [T, (nq+2nkv)*hd]
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        attn = attend(q.reshape(T, nq, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd), layer)
        o = _reduce(ops.linear(attn.reshape(T, nq * hd), w[p + "o"], w.get(p + "o_bias")),
                    comm)                                               # [T, d]
        x = x + ops.gemma_norm(o, w[p + "post_attn_norm"])
        gu = ops.linear(ops.gemma_norm(x, w[p + "mlp_norm"]), w[p + "gate_up"],
                        w.get(p + "gate_up_bias"))                     # [T, 2I]
        m = _reduce(ops.geglu_linear(gu, w[p + "down"], w.get(p + "down_bias")),
                    comm)                                               # [T, d]
        x = x + ops.gemma_norm(m, w[p + "post_mlp_norm"])
    return x


def softcap_logits(cfg: ModelConfig, logits: torch.Tensor) -> torch.Tensor:
    """Gemma-2's final soft-cap cap * tanh(logits / cap) (identity for other models)."""
    cap = cfg.final_softcap
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _head(w: dict, ops, x, residual, rows, return_hidden: bool, comm=None) -> torch.Tensor:
    """The final norm (and lm_head) of the token rows `rows` (None: all)."""
    out = _head_local(w, ops, x, residual, rows, return_hidden)
    return out if return_hidden or comm is None else comm.gather_vocab(out)


def _head_local(w: dict, ops, x, residual, rows, return_hidden: bool) -> torch.Tensor:
    if rows is not None:             # the norm is per row: select first
        if isinstance(rows, torch.Tensor):
            x = x.index_select(0, rows)
            residual = residual.index_select(0, rows) if residual is not None else None
        else:
            x = x[rows]
            residual = residual[rows] if residual is not None else None
    cfg = ops.cfg
    if cfg.is_gemma2:
        h = ops.gemma_norm(x, w["norm"])                                # [T', d]
        return h if return_hidden else \
            softcap_logits(cfg, F.linear(h, w["lm_head"]).float())      # [T', V] fp32
    if return_hidden:
        h, _ = ops.rms_norm(x, w["norm"], residual)                     # [T', d]
        return h
    logits, _ = ops.norm_linear(x, residual, w["norm"], w["lm_head"], logits=True)
    return logits                                                       # [T', V] fp32
