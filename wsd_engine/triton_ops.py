"""The "triton" backend: the layer operations of `model.forward` through the kernels in
`wsd_engine.kernels`. Same data flow and cache layout as `model.TorchOps`. Matmuls are
cuBLAS (`F.linear`), or, for one token with `fused_gemv` on, the `gemv` kernel with the
RMSNorm / SwiGLU before it fused in (three fewer launches per layer; off by default; with
CUDA graphs an engine times both on the card, `tuning.tune_decode_kernels`). Imported
lazily (it imports Triton): `load_model(backend="triton")`.
On a machine without CUDA the kernels run only under TRITON_INTERPRET=1 (tests).
Gemma-2: the attention kernels get its scale, score soft-cap and each layer's sliding
window; its GeGLU is the gated-activation kernel; its (1 + w) norms are TorchOps' (torch
operations, no kernel yet).
"""
from __future__ import annotations

import os

import torch

from .cache import StaticKVCache
from .config import ModelConfig
from .errors import ConfigError
from .model import TorchOps

# TritonOps.fused_gemv's default; `Model.set_decode_kernels` changes it per model
FUSED_GEMV_DEFAULT = False


class TritonOps(TorchOps):
    """The torch reference's data flow (its matmul chains are the fallback here) with the
    layer operations swapped for the kernels."""

    name = "triton"

    def __init__(self, cfg: ModelConfig, device: torch.device):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set "
                              "before import, for tests on CPU); use backend='torch' on CPU")
        try:
            from .kernels.decode_attention import decode_attention, decode_attention_rows
            from .kernels.gemv import gemv
            from .kernels.pdl import PDL_DEFAULT
            from .kernels.prefill_attention import prefill_attention, prefill_attention_rows
            from .kernels.rms_norm import rms_norm
            from .kernels.swiglu import geglu, swiglu
        except ImportError as e:
            raise ConfigError(f"backend='triton' needs Triton: {e}; `pip install triton` or use "
                              "backend='torch'") from e
        super().__init__(cfg)
        self._decode_attention, self._prefill_attention = decode_attention, prefill_attention
        self._decode_attention_rows = decode_attention_rows
        self._prefill_attention_rows = prefill_attention_rows
        self._rms_norm, self._swiglu, self._gemv = rms_norm, swiglu, gemv
        self._geglu = geglu
        self.fused_gemv = FUSED_GEMV_DEFAULT
        # programmatic dependent launch for the one-token kernels (gemv, decode attention):
        # on an sm_90+ GPU each starts while its predecessor finishes (kernels/pdl.py);
        # set before capturing graphs. With fused_gemv the whole layer is such kernels.
        self.pdl = PDL_DEFAULT

    def _gemma_kw(self, layer: int) -> dict:
        """Gemma-2's attention options for `layer` (its scale, score soft-cap and sliding
        window, if the layer has one) as the attention kernels take them; {} otherwise
        (the kernels' defaults: today's variants, untouched)."""
        cfg = self.cfg
        if not cfg.is_gemma2:
            return {}
        return dict(scale=cfg.attn_scale, softcap=cfg.attn_softcap,
                    window=cfg.layer_windows[layer] if cfg.layer_windows else None)

    def rms_norm(self, x, weight, residual=None):
        """norm(x + residual) and the new residual stream, one kernel (fused add)."""
        if residual is None:
            return self._rms_norm(x, weight, self.cfg.rms_norm_eps), x
        return self._rms_norm(x, weight, self.cfg.rms_norm_eps, residual=residual)

    def attention(self, q, k, v, cache: StaticKVCache, layer: int, positions, cos, sin,
                  start: int):
        """q [T, nq, hd], k/v [T, nkv, hd] unrotated (strided views of the fused qkv).
        `start` may be a [1] device tensor (graph capture): no kernel here reads it on
        the host."""
        kc, vc = cache.slot_k(layer), cache.slot_v(layer)               # [nkv, S, hd]
        if q.shape[0] == 1:
            # decode: RoPE, this token's K/V into the cache and flash-decoding over the
            # cache, one launch (append mode)
            # the length is position + 1: the launcher adds it to an int, the kernel to a
            # device position (no extra launch per layer in a graph-captured step)
            pos = start if isinstance(start, int) else positions
            return self._decode_attention(q[0], kc, vc, pos, k_new=k[0], v_new=v[0],
                                          cos=cos, sin=sin, pdl=self.pdl, seq_len_offset=1,
                                          **self._gemma_kw(layer))[None]  # [1, nq, hd]
        # prefill / chunk scoring: RoPE + cache write + causal attention in one launch
        return self._prefill_attention(q, k, v, kc, vc, cos, sin, start,
                                       **self._gemma_kw(layer))           # [T, nq, hd]

    def attention_rows(self, q, k, v, cache: StaticKVCache, layer: int, rb, cos, sin):
        """Several rows, each in its own cache slot (see TorchOps.attention_rows): one
        launch for the batch, reading the rows' slots and positions on the device (a decode
        batch reads nothing on the host: it can be graph-captured)."""
        kc, vc = cache.k[layer], cache.v[layer]                         # [n_slots, nkv, S, hd]
        if rb.is_decode:
            return self._decode_attention_rows(q, kc, vc, rb.slots, rb.positions, k, v, cos,
                                               sin, max_len=rb.max_len_hint, pdl=self.pdl,
                                               **self._gemma_kw(layer))
        return self._prefill_attention_rows(q, k, v, kc, vc, cos, sin, rb.cu_seqlens, rb.slots,
                                            rb.starts, rb.max_q,
                                            **self._gemma_kw(layer))   # [T, nq, hd]

    def swiglu(self, gate_up):
        return self._swiglu(gate_up)

    def geglu_linear(self, gate_up, weight, bias=None):
        """Gemma-2's MLP down projection after the GeGLU kernel."""
        return self.linear(self._geglu(gate_up), weight, bias)

    # ---- matmuls: cuBLAS, or (one token, fused_gemv) the gemv kernel with its neighbours
    def _one_token(self, x) -> bool:
        return self.fused_gemv and x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1

    def linear(self, x, weight, bias=None):
        if self._one_token(x):
            return self._gemv(x, weight, bias, pdl=self.pdl)
        return super().linear(x, weight, bias)

    def norm_linear(self, x, residual, norm_weight, weight, bias=None, logits=False):
        """linear(rms_norm(x + residual)) and the new residual stream (one launch for one
        token with fused_gemv); logits=True returns fp32 (the lm_head)."""
        eps = self.cfg.rms_norm_eps
        if self._one_token(x):
            if residual is None:
                return self._gemv(x, weight, bias, pre="rmsnorm", norm_weight=norm_weight,
                                  eps=eps, logits=logits, pdl=self.pdl), x
            return self._gemv(x, weight, bias, pre="rmsnorm", residual=residual,
                              norm_weight=norm_weight, eps=eps, logits=logits, pdl=self.pdl)
        return super().norm_linear(x, residual, norm_weight, weight, bias, logits)

    def swiglu_linear(self, gate_up, weight, bias=None):
        if self._one_token(gate_up):
            return self._gemv(gate_up, weight, bias, pre="swiglu", pdl=self.pdl)
        return super().swiglu_linear(gate_up, weight, bias)
