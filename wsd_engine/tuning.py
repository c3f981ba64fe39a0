"""Choosing the one-token (decode) kernels of a triton-backend model on its GPU.

The triton backend can run a one-token step's matmuls through cuBLAS with the norm /
SwiGLU kernels apart (the plain path), or through the `gemv` kernel with them fused in,
and launch its kernels with programmatic dependent launch on sm_90+ GPUs
(`Model.set_decode_kernels`). Which is fastest depends on the card, the driver and the
model's shapes, so `tune_decode_kernels` times each on the graph-captured one-sequence
decode step and keeps the fastest (`WSD(cuda_graphs=True)` does, before capturing).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import graphs
from .errors import ConfigError

if TYPE_CHECKING:
    from .runner import Model

# 4%: about three times the measured bf16 difference of two correct paths (1.3%, below)
TUNING_MAX_REL_RMS = 0.04


def tuning_candidates(model: "Model") -> list[dict]:
    """The one-token kernel settings `tune_decode_kernels` times on this device, the plain
    path first: cuBLAS matmuls with the norm / SwiGLU kernels apart, then the fused gemv,
    and with programmatic dependent launch where the GPU has it (sm_90+)."""
    cands = [dict(fused_gemv=False, pdl=False), dict(fused_gemv=True, pdl=False)]
    if model.can_capture:
        from .kernels.pdl import pdl_supported
        if pdl_supported(model.device):
            cands += [dict(fused_gemv=True, pdl=True), dict(fused_gemv=False, pdl=True)]
    return cands


def tune_decode_kernels(model: "Model", context: int | None = None, replays: int = 20,
                        candidates: list[dict] | None = None, min_gain: float = 0.03) -> dict:
    """Time the graph-captured decode step with each one-token kernel setting
    (`tuning_candidates(model)` by default) on this GPU and keep the fastest: the step at
    `context` tokens (default min(512, max_seq_len)) after a prefill of random tokens,
    `replays` back-to-back replays, median of 3. The plain path (the first candidate) is
    kept unless another is faster by more than `min_gain` (3%): a near tie always resolves
    the same way. All candidates compute the same math (the fused gemv rounds in another
    order, as any kernel choice may). A candidate that fails is recorded with its error
    and skipped; so is one whose logits are not finite or differ from the first working
    candidate's by more than bf16 rounding can explain (`logits_disagree`): tuning never
    trades correctness for speed. Run before capturing graphs (it captures and drops its
    own); resets the cache. Returns the record, also kept in `model.decode_tuning`:
    {"context", "replays", "min_gain", "rows": [{fused_gemv, pdl, ms | error
    (+ ms_rejected)}], "chosen", "ms"}."""
    with model.reserved():
        return _tune(model, context, replays, candidates, min_gain)


def _tune(model: "Model", context, replays, candidates, min_gain) -> dict:
    if not model.can_capture:
        raise ConfigError("tuning the decode kernels needs device='cuda' and "
                          f"backend='triton' (this model: {model.device}, {model.backend})")
    if model.tensor_parallel > 1:
        raise ConfigError("tuning the decode kernels runs on whole models only; a "
                          "tensor-parallel model keeps its kernel settings (give fused_gemv / "
                          "pdl explicitly)")
    if model.has_graphs:
        raise ConfigError("this model has captured CUDA graphs, which keep the kernels they "
                          "were captured with; tune before capturing (or clear_graphs() "
                          "first)")
    cands = tuning_candidates(model) if candidates is None else list(candidates)
    if not cands or any(not isinstance(c, dict) or set(c) != {"fused_gemv", "pdl"}
                        or not all(isinstance(v, bool) for v in c.values()) for c in cands):
        raise ConfigError("candidates must be a non-empty list of "
                          f"{{'fused_gemv': bool, 'pdl': bool}} dicts, got {candidates!r}")
    context = min(512, model.max_seq_len) if context is None else context
    if not isinstance(context, int) or not 1 <= context <= model.max_seq_len:
        raise ConfigError(f"context must be an int in [1, max_seq_len={model.max_seq_len}], "
                          f"got {context!r}")
    if not isinstance(replays, int) or replays < 1:
        raise ConfigError(f"replays must be an int >= 1, got {replays!r}")
    before = model.decode_kernels
    rows = []
    ref = None          # logits of the first candidate that ran: the others must agree
    for c in cands:
        row = dict(c)
        try:
            model.set_decode_kernels(**c, chosen=False)
            ms, logits = _time_decode_step(model, context, replays)
            bad = logits_disagree(ref, logits)
            if bad:
                row["error"] = f"rejected: {bad}"
                row["ms_rejected"] = ms
            else:
                row["ms"] = ms
                ref = logits if ref is None else ref
        except Exception as e:  # noqa: BLE001 - recorded; the other candidates go on
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        finally:
            graphs.clear_graphs(model)
            model.cache.reset()
        rows.append(row)
    ok = [r for r in rows if "ms" in r]
    if not ok:
        model.set_decode_kernels(**before, chosen=False)
        raise RuntimeError("every decode kernel candidate failed: "
                           + "; ".join(f"{r['fused_gemv'], r['pdl']}: {r['error']}"
                                       for r in rows))
    best = min(ok, key=lambda r: r["ms"])
    chosen = best if best["ms"] < ok[0]["ms"] * (1.0 - min_gain) else ok[0]
    model.set_decode_kernels(fused_gemv=chosen["fused_gemv"], pdl=chosen["pdl"])
    model.decode_tuning = {"context": context, "replays": replays, "min_gain": min_gain,
                           "rows": rows, "ms": chosen["ms"],
                           "chosen": dict(fused_gemv=chosen["fused_gemv"],
                                          pdl=chosen["pdl"])}
    return model.decode_tuning


def logits_disagree(ref: torch.Tensor | None, out: torch.Tensor) -> str | None:
    """Why a tuning candidate's decode-step logits cannot be the same math as the first
    candidate's, or None. The candidates round differently in bf16: the plain and fused
    paths of an 8-layer random-weight bf16 model differ by 1.3% relative RMS (CPU
    interpreter, whose bf16 stores truncate; each is ~1.5% from fp32), more layers add
    some. A broken kernel on this card or driver (a race, a stale read) gives NaN / inf or
    errors far beyond that: a relative RMS difference above TUNING_MAX_REL_RMS (4%) is
    rejected, so tuning never picks it."""
    if not bool(torch.isfinite(out).all()):
        return "non-finite logits"
    if ref is None:
        return None
    if out.shape != ref.shape:
        return f"logits of shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if rel > TUNING_MAX_REL_RMS:
        return (f"logits disagree with the first candidate's (relative RMS difference "
                f"{rel:.3g} > {TUNING_MAX_REL_RMS})")
    return None


def _time_decode_step(model: "Model", context: int, replays: int) -> tuple[float, torch.Tensor]:
    """ms per replay of the captured decode step at position context - 1, after an eager
    prefill of context - 1 random tokens (real cache contents, never zeros), and the step's
    fp32 logits (the same tokens for every candidate: comparable)."""
    graphs.capture_decode(model)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (context,), generator=gen)
    ids = ids.to(model.device)
    if context > 1:
        model.forward(ids[:-1], 0)
    logits = graphs.replay_decode(model, ids[-1:], context - 1).float().clone()
    graph = model.graphs["decode"]["graph"]
    torch.cuda.synchronize(model.device)
    times = []
    for _ in range(3):
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(replays):
            graph.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) / replays)
    return sorted(times)[1], logits
