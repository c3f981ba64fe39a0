"""Token selection from a logits row, per model: greedy, or temperature / top-k / top-p.

Everything stays on the device and never syncs with the host (no `.item()`), so a
sampling step can live inside a captured CUDA graph. Sampling is the exponential race:
argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / sum(p), and the draw
only advances a seeded `torch.Generator`, so a seed gives the same tokens every run.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from wsd_engine.errors import RequestError


@dataclass(slots=True)
class SamplingParams:
    """Per-model sampling settings. temperature 0 = greedy (the paper's default)."""

    temperature: float = 0.0   # >= 0; 0 means argmax
    top_p: float = 1.0         # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0             # keep the k largest logits (ties at the k-th kept); 0 disables
    seed: int = 0              # seeds the generator of each request

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 < float(p) <= 1.0):
            raise RequestError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not (0 <= s < 2**64):
            raise RequestError(f"seed must be an integer in [0, 2**64), got {s!r}")
        self.temperature, self.top_p, self.top_k, self.seed = float(t), float(p), int(k), int(s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int, device) -> torch.Generator:
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


def _kept_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities, 0 outside the top-k / top-p set."""
    # subtract the max first: with a tiny temperature (1e-38 is valid) the plain quotient
    # overflows to inf and softmax gives NaN; shifted, the best logit is 0 and the others
    # go to -inf, i.e. the argmax (ties split evenly)
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)) / params.temperature         # (..., V)
    V = z.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]      # (..., 1)
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)                                    # (..., V)
    if params.top_p < 1.0:
        sp, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        cum = torch.cumsum(sp, dim=-1)
        before = torch.nn.functional.pad(cum[..., :-1], (1, 0))        # mass ranked strictly before
        keep_sorted = before < params.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
    return probs


def sample_from_logits(logits: torch.Tensor, params: SamplingParams,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row: [V] -> 0-dim int64, [..., V] -> [...] int64, on logits' device.

    Greedy (temperature 0) is torch.argmax (lowest index among ties) and ignores the
    generator. Otherwise draws V Exp(1) variates per row from `generator` (a fresh one
    seeded with params.seed when None) and returns argmax of kept p_i / E_i."""
    if params.temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    if generator is None:
        generator = make_generator(params.seed, logits.device)
    probs = _kept_probs(logits, params)                                 # (..., V) fp32
    e = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    e.exponential_(generator=generator)                                 # (..., V) ~ Exp(1)
    # clamp: an E of exactly 0 would give 0/0 = NaN for a masked token, which argmax picks
    race = probs / e.clamp_min(torch.finfo(torch.float32).tiny)
    race = race.masked_fill(probs <= 0, -1.0)                           # masked never win
    return torch.argmax(race, dim=-1)


class Sampler:
    """Per-request, per-model sampler: the params plus a generator seeded on `device`."""

    def __init__(self, params: Optional[SamplingParams] = None, device="cpu"):
        self.params = params if params is not None else SamplingParams()
        self.device = torch.device(device)
        self.generator = make_generator(self.params.seed, self.device)

    def reset(self) -> None:
        """Re-seed: the next draws repeat the sequence from the start."""
        self.generator.manual_seed(self.params.seed)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """[V] -> 0-dim int64 device tensor ([..., V] -> [...]); no host sync."""
        return sample_from_logits(logits, self.params, self.generator)
