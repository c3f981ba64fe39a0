"""One model on one device: weights, static KV cache, RoPE tables and the phases that run
it — `prefill`, `decode_one_token`, `decode_steps`, `score_chunk` — plus the public
`score` / `generate`, and the CUDA graphs that replay them.
"""
from __future__ import annotations

import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .cache import StaticKVCache
from .config import ModelConfig, describe_arg, parse_dtype
from .errors import ConfigError, ContextOverflowError, RequestError
from .loader import load_weights
from .memory import check_fits
from .model import TorchOps, forward, forward_rows, rope_tables
from .rows import RowBatch
from .sharing import CacheOwner, CacheResidency
from .switch import first_pass_rows
from .tokenization import has_tokenizer, load_tokenizer, tokenizer_eos_ids

BACKENDS = ("torch", "triton")
DEFAULT_MAX_SEQ_LEN = 4096
MAX_BATCH_SIZE = 1024
# prompt lengths with a captured prefill graph (`capture_prefill`): a prompt runs in the
# smallest that holds it, so the padding is under 2x (weight reads dominate at these sizes)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)


def _make_ops(backend: str, cfg: ModelConfig, device: torch.device):
    if backend == "torch":
        return TorchOps(cfg)
    if backend == "triton":
        from .triton_ops import TritonOps  # lazy: imports Triton
        return TritonOps(cfg, device)
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass(eq=False)
class Model:
    """A loaded model. Build with `load_model`."""

    path: str
    config: ModelConfig
    weights: dict
    cache: StaticKVCache
    cos: torch.Tensor          # [max_seq_len, hd] fp32
    sin: torch.Tensor          # [max_seq_len, hd] fp32
    ops: object
    device: torch.device
    dtype: torch.dtype
    _tokenizer: object = None
    # captured CUDA graphs and their static buffers, in one place: "decode",
    # ("score", n_tokens) and ("steps", n_steps) -> {"graph", "token", "pos", "out"}
    _graphs: dict = field(default_factory=dict)
    # the one-token kernel choice: set by set_decode_kernels (a non-None value) or by
    # tune_decode_kernels, whose measurements stay in decode_tuning
    _kernels_chosen: bool = False
    decode_tuning: dict | None = None
    # who may use the cache now: the lock, the resident sequence, parked ones
    _residency: CacheResidency = field(default_factory=CacheResidency, repr=False)

    # ---- sharing ---------------------------------------------------------------------
    def reserved(self, owner: CacheOwner | None = None):
        """Context manager: hold this model (its cache) for `owner`'s sequence. Waits for
        other threads; parks another owner's unfinished sequence and puts `owner`'s back
        (see `sharing`). No owner: a one-shot use whose sequence is not kept."""
        return self._residency.reserved(self.cache, owner)

    @property
    def cache_swaps(self) -> int:
        """How many times a request's sequence was parked to let another one run."""
        return self._residency.swaps

    @property
    def parked_sequences(self) -> int:
        """Sequences parked now (suspended requests whose owner is still alive)."""
        return self._residency.parked

    # ---- metadata ----------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.ops.name

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def max_batch_size(self) -> int:
        """Cache slots: how many sequences the batched phases hold at once."""
        return self.cache.n_slots

    def slot_length(self, slot: int) -> int:
        """Valid cache positions of a slot."""
        return self.cache.lengths[slot]

    @property
    def has_loaded_tokenizer(self) -> bool:
        """A tokenizer was given or loaded already (a folder without one may still have
        one set by the caller)."""
        return self._tokenizer is not None

    @property
    def has_graphs(self) -> bool:
        """Whether any CUDA graph is captured on this model."""
        return bool(self._graphs)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (loaded on first use; TokenizerError if absent)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        """config.json + generation_config.json eos ids, plus the tokenizer's eos token."""
        ids = list(self.config.eos_token_ids)
        if self._tokenizer is not None or has_tokenizer(self.path):
            for e in tokenizer_eos_ids(self.tokenizer):
                if e not in ids:
                    ids.append(e)
        return ids

    # ---- input checks --------------------------------------------------------------
    def as_tokens(self, token_ids) -> torch.Tensor:
        """list[int] / 1-D tensor -> int64 device tensor [T], validated (range checked on
        the host before anything reaches the device)."""
        if isinstance(token_ids, torch.Tensor):
            t = token_ids.reshape(-1) if token_ids.dim() == 2 and token_ids.shape[0] == 1 else token_ids
            if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise RequestError("token_ids must be a 1-D integer tensor or a list of ints "
                                   f"(got {tuple(token_ids.shape)} {token_ids.dtype})")
            ids = t.detach().to("cpu", torch.int64)
            lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
        else:
            if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
                raise RequestError("token_ids must be a list of ints or a 1-D integer tensor, "
                                   f"got {type(token_ids).__name__}")
            ids = list(token_ids)
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
            if bad:
                raise RequestError("token_ids must be ints, got an element of type "
                                   f"{type(bad[0]).__name__}")
            ids = [int(i) for i in ids]
            lo, hi = (min(ids), max(ids)) if ids else (0, 0)
        if len(ids) == 0:
            raise RequestError("token_ids is empty; give at least one token")
        if lo < 0 or hi >= self.config.vocab_size:
            raise RequestError(f"token id out of range [0, {self.config.vocab_size}): "
                               f"min {lo}, max {hi}")
        if not isinstance(ids, torch.Tensor):
            ids = torch.tensor(ids, dtype=torch.int64)
        return ids.to(self.device)

    # ---- phases --------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, return_hidden: bool = False,
                last_only: bool = False, rows=None) -> torch.Tensor:
        """Tokens [T] at positions start.. against cache [0, start); sets cache length.
        Logits (or final hidden states) of every row, the last (`last_only`) or `rows`."""
        if start > self.cache.length:
            raise ValueError(f"start {start} is past the cache length {self.cache.length}")
        rows = slice(-1, None) if last_only else rows
        return forward(self.config, self.weights, self.ops, tokens, start, self.cache,
                       self.cos, self.sin, return_hidden=return_hidden, rows=rows)

    def prefill(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill the cache with a prompt (from position `start`); logits of the last token [V].
        Through a captured prefill graph when one fits (`capture_prefill`), else eagerly."""
        return self._prefill_last(tokens, start, hidden=False)

    def prefill_hidden(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """As `prefill`, returning the last token's final-normed hidden state [d] instead
        (the WSD base: its scoring kernel applies the lm_head itself)."""
        return self._prefill_last(tokens, start, hidden=True)

    def _prefill_last(self, tokens: torch.Tensor, start: int, hidden: bool) -> torch.Tensor:
        n = tokens.shape[0]
        g = self._prefill_graph(n, start, hidden)
        if g is None:
            return self.forward(tokens, start, return_hidden=hidden, last_only=True)[0]
        # the graph runs b >= n tokens: the prompt, then copies of its last token. Their
        # K/V land in cache positions [start + n, start + b), past the length the replay
        # sets (start + n): never attended to (a position is written again before it is read)
        b = g["token"].shape[0]
        g["row"].fill_(n - 1)
        padded = torch.cat([tokens, tokens[-1:].expand(b - n)])
        out = self._replay(g, padded, start, advance=n)
        return out[0].clone()               # the static buffer is the next replay's output

    def _prefill_graph(self, n: int, start: int, hidden: bool):
        """The smallest captured prefill graph of this kind for n tokens at `start` (its
        b tokens must fit the cache), or None."""
        fits = [(key[1], g) for key, g in self._graphs.items()
                if isinstance(key, tuple) and key[0] == "prefill" and key[2] == hidden
                and n <= key[1] and start + key[1] <= self.max_seq_len]
        return min(fits, key=lambda bg: bg[0])[1] if fits else None

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """One token [1] at the current cache length; its logits [V] (a view of a static
        buffer when the step is graph-captured: use it before the next step)."""
        g = self._graphs.get("decode")
        if g is None:
            return self.forward(token, self.cache.length)[0]
        return self._replay(g, token, self.cache.length)[0]

    def decode_steps(self, token: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy decoding of n steps with no host sync (the pilot's drafting chunks): feeds
        `token` [1] at the cache length, then each step's argmax. Returns [n + 1] int64 on the device: `token` and
        its n greedy successors (the last one is chosen but not fed; the cache grows by n).
        One graph replay when an n-step graph was captured (`capture_steps(n)`), else n
        decode steps (each a replay when the decode step was captured)."""
        start = self.cache.length
        self.cache.check_fits(start, n)
        g = self._graphs.get(("steps", n))
        if g is not None:
            return self._replay(g, token, start, advance=n).clone()
        toks = [token.reshape(1)]
        for _ in range(n):
            toks.append(torch.argmax(self.decode_one_token(toks[-1]), dim=-1).reshape(1))
        return torch.cat(toks)

    def score_chunk(self, tokens: torch.Tensor, start: int, return_hidden: bool = False):
        """A chunk of another model's tokens appended at `start` (the cross-model prefix
        prefill): writes their K/V, returns logits [T, V] (or final hidden states [T, d];
        a static graph buffer when a graph for T tokens was captured)."""
        g = self._graphs.get(("score", tokens.shape[0])) if return_hidden else None
        if g is None:
            return self.forward(tokens, start, return_hidden=return_hidden)
        return self._replay(g, tokens, start)

    # ---- batched phases: several sequences, each in its own cache slot ---------------
    @torch.inference_mode()
    def run_rows(self, tokens: torch.Tensor, slots, counts, return_hidden: bool = False,
                 last_only: bool = False) -> torch.Tensor:
        """One forward over several rows: row b appends counts[b] tokens (consecutive in
        `tokens` [T]) to cache slot slots[b] at its current length. Returns fp32 logits
        (or final-normed hidden states) of every token [T, .], or of each row's last token
        [B, .] (`last_only`). ContextOverflowError (nothing written) if a row does not fit."""
        lengths = self.cache.lengths
        starts = [lengths[s] for s in slots]
        for p0, n in zip(starts, counts):
            self.cache.check_fits(p0, n)
        rb = RowBatch.build(slots, starts, counts, self.device)
        out = forward_rows(self.config, self.weights, self.ops, tokens, rb, self.cache,
                           self.cos, self.sin, return_hidden=return_hidden,
                           rows=rb.last if last_only else None)
        for s, p0, n in zip(slots, starts, counts):
            lengths[s] = p0 + n
        return out

    def prefill_rows(self, prompts: list[torch.Tensor], slots, hidden: bool = False) -> torch.Tensor:
        """Empty slots filled with prompts (each [n_b] on the device), one forward: the
        last token's logits [B, V] (or final hidden states [B, d] with `hidden`)."""
        for s in slots:
            self.cache.reset(s)
        return self.run_rows(torch.cat(prompts), slots, [p.shape[0] for p in prompts],
                             return_hidden=hidden, last_only=True)

    def decode_rows(self, tokens: torch.Tensor, slots) -> torch.Tensor:
        """One token per row (tokens [B] on the device) at each slot's length: logits [B, V]."""
        return self.run_rows(tokens, slots, [1] * len(slots))

    def score_rows(self, tokens: torch.Tensor, slots, counts) -> torch.Tensor:
        """Chunks of another model's tokens, one per row, appended to the rows' slots (the
        cross-model prefix prefill): final hidden states of every token [T, d]."""
        return self.run_rows(tokens, slots, counts, return_hidden=True)

    def truncate_slot(self, slot: int, length: int) -> None:
        """Keep a slot's positions [0, length): O(1)."""
        self.cache.truncate(length, slot)

    def release_slot(self, slot: int) -> None:
        """A finished row's slot is free again: O(1)."""
        self.cache.reset(slot)

    @torch.inference_mode()
    def score_switch(self, hidden: torch.Tensor, ids: torch.Tensor, counts: list[int],
                     carry: torch.Tensor, n_prev: torch.Tensor, window: torch.Tensor,
                     log_gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of draft tokens under this model and the WSD rule for several rows, on the
        device: final hidden states [T, d] (token j predicts ids[j]; row b owns counts[b]
        consecutive tokens), the rule's per-row state (see `switch.first_pass_rows`:
        carry [B, W-1] float64, n_prev, window, log_gamma float64 [B]). Returns (log p [T]
        fp32, first [B] int64: the index in the row's chunk of the token completing its
        first passing window, or -1). The triton backend does it in the switch_score
        kernels (the lm_head read once for all rows, the [T, V] logits never written, the
        rule in float64 in the kernel); the torch backend with log_softmax and the same
        float64 rule."""
        if self.backend == "triton":
            from .kernels.switch_score import switch_score_rows
            cu = torch.tensor([0] + list(counts), device=hidden.device).cumsum(0)
            out = switch_score_rows(hidden, self.weights["lm_head"], ids, cu, carry, n_prev,
                                    window, log_gamma)
            return out.logp, out.first
        logits = self.logits(hidden)                                     # [T, V] fp32
        logp = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
        return logp, first_pass_rows(logp, counts, carry, n_prev, window, log_gamma)

    # ---- one-token kernel options (triton backend) ------------------------------------
    def set_decode_kernels(self, fused_gemv: bool | None = None, pdl: bool | None = None) -> None:
        """Choose the one-token (decode) kernels of the triton backend; None leaves a
        setting as it is. fused_gemv: every one-token matmul through the `gemv` kernel with
        the RMSNorm / SwiGLU / logits fused in (5 launches per layer). pdl: launch them with
        programmatic dependent launch (sm_90+ GPUs; a no-op elsewhere). Captured graphs keep
        the kernels they were captured with, so set this before capturing (ConfigError
        otherwise: call `clear_graphs()` first)."""
        for name, v in (("fused_gemv", fused_gemv), ("pdl", pdl)):
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{name} must be True, False or None, got {v!r}")
        want = {k: v for k, v in (("fused_gemv", fused_gemv), ("pdl", pdl)) if v is not None}
        if not want:
            return
        if self.backend != "triton":
            if any(want.values()):
                raise ConfigError(f"{', '.join(k for k, v in want.items() if v)} needs "
                                  f"backend='triton' (this model: {self.backend})")
            return
        if self._graphs and any(getattr(self.ops, k) != v for k, v in want.items()):
            raise ConfigError("this model has captured CUDA graphs, which keep the kernels "
                              "they were captured with; call clear_graphs() first, then "
                              "capture again")
        for k, v in want.items():
            setattr(self.ops, k, v)
        self._kernels_chosen = True

    @property
    def can_capture(self) -> bool:
        """CUDA graphs (and kernel tuning) need a CUDA device and the triton backend."""
        return self.device.type == "cuda" and self.backend == "triton"

    @property
    def decode_kernels_chosen(self) -> bool:
        """Whether the one-token kernels were set (`set_decode_kernels` with a value, or
        `tune_decode_kernels`): an engine with `tune_kernels=None` leaves such a model as it is."""
        return self._kernels_chosen

    def tuning_candidates(self) -> list[dict]:
        """The one-token kernel settings `tune_decode_kernels` times on this device, the
        plain path first: cuBLAS matmuls with the norm / SwiGLU kernels apart, then the
        fused gemv, and with programmatic dependent launch where the GPU has it (sm_90+)."""
        cands = [dict(fused_gemv=False, pdl=False), dict(fused_gemv=True, pdl=False)]
        if self.can_capture:
            from .kernels.pdl import pdl_supported
            if pdl_supported(self.device):
                cands += [dict(fused_gemv=True, pdl=True), dict(fused_gemv=False, pdl=True)]
        return cands

    def tune_decode_kernels(self, context: int | None = None, replays: int = 20,
                            candidates: list[dict] | None = None,
                            min_gain: float = 0.03) -> dict:
        """Time the graph-captured decode step with each one-token kernel setting
        (`tuning_candidates()` by default) on this GPU and keep the fastest: the step at
        `context` tokens (default min(512, max_seq_len)) after a prefill of random tokens,
        `replays` back-to-back replays, median of 3. The plain path (the first candidate)
        is kept unless another is faster by more than `min_gain` (3%): a near tie always
        resolves the same way. All candidates compute the same math (the fused gemv rounds
        in another order, as any kernel choice may). A candidate that fails is recorded
        with its error and skipped; so is one whose logits are not finite or differ from
        the first working candidate's by more than bf16 rounding can explain
        (`_logits_disagree`): tuning never trades correctness for speed. Run before
        capturing graphs (it captures and drops its own); resets the cache. Returns the
        record, also kept in `decode_tuning`: {"context", "replays", "rows": [{fused_gemv,
        pdl, ms | error (+ ms_rejected)}], "chosen", "ms"}."""
        with self.reserved():
            return self._tune_decode_kernels(context, replays, candidates, min_gain)

    def _tune_decode_kernels(self, context, replays, candidates, min_gain) -> dict:
        if not self.can_capture:
            raise ConfigError("tuning the decode kernels needs device='cuda' and "
                              f"backend='triton' (this model: {self.device}, {self.backend})")
        if self._graphs:
            raise ConfigError("this model has captured CUDA graphs, which keep the kernels they "
                              "were captured with; tune before capturing (or clear_graphs() "
                              "first)")
        cands = self.tuning_candidates() if candidates is None else list(candidates)
        if not cands or any(not isinstance(c, dict) or set(c) != {"fused_gemv", "pdl"}
                            or not all(isinstance(v, bool) for v in c.values())
                            for c in cands):
            raise ConfigError("candidates must be a non-empty list of "
                              "{'fused_gemv': bool, 'pdl': bool} dicts, got "
                              f"{candidates!r}")
        context = min(512, self.max_seq_len) if context is None else context
        if not isinstance(context, int) or not 1 <= context <= self.max_seq_len:
            raise ConfigError(f"context must be an int in [1, max_seq_len={self.max_seq_len}], "
                              f"got {context!r}")
        if not isinstance(replays, int) or replays < 1:
            raise ConfigError(f"replays must be an int >= 1, got {replays!r}")
        before = dict(fused_gemv=self.ops.fused_gemv, pdl=self.ops.pdl)
        chosen_before = self._kernels_chosen
        rows = []
        ref = None          # logits of the first candidate that ran: the others must agree
        for c in cands:
            row = dict(c)
            try:
                self.set_decode_kernels(**c)
                ms, logits = self._time_decode_step(context, replays)
                bad = _logits_disagree(ref, logits)
                if bad:
                    row["error"] = f"rejected: {bad}"
                    row["ms_rejected"] = ms
                else:
                    row["ms"] = ms
                    ref = logits if ref is None else ref
            except Exception as e:  # noqa: BLE001 - recorded; the other candidates go on
                row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            finally:
                self.clear_graphs()
                self.cache.reset()
            rows.append(row)
        ok = [r for r in rows if "ms" in r]
        if not ok:
            self.set_decode_kernels(**before)
            self._kernels_chosen = chosen_before
            raise RuntimeError("every decode kernel candidate failed: "
                               + "; ".join(f"{r['fused_gemv'], r['pdl']}: {r['error']}"
                                           for r in rows))
        best = min(ok, key=lambda r: r["ms"])
        chosen = best if best["ms"] < ok[0]["ms"] * (1.0 - min_gain) else ok[0]
        self.set_decode_kernels(fused_gemv=chosen["fused_gemv"], pdl=chosen["pdl"])
        self.decode_tuning = {"context": context, "replays": replays, "min_gain": min_gain,
                              "rows": rows, "ms": chosen["ms"],
                              "chosen": dict(fused_gemv=chosen["fused_gemv"],
                                             pdl=chosen["pdl"])}
        return self.decode_tuning

    def _time_decode_step(self, context: int, replays: int) -> tuple[float, torch.Tensor]:
        """ms per replay of the captured decode step at position context - 1, after an
        eager prefill of context - 1 random tokens (real cache contents, never zeros), and
        the step's fp32 logits (the same tokens for every candidate: comparable)."""
        self.capture_decode()
        g = self._graphs["decode"]
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, self.config.vocab_size, (context,), generator=gen)
        ids = ids.to(self.device)
        if context > 1:
            self.forward(ids[:-1], 0)
        logits = self._replay(g, ids[-1:], context - 1).float().clone()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(3):
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(replays):
                g["graph"].replay()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / replays)
        return sorted(times)[1], logits

    def clear_graphs(self) -> None:
        """Drop every captured CUDA graph (and its memory pool); calls run eagerly until
        the next capture."""
        self._graphs.clear()

    # ---- CUDA graphs ---------------------------------------------------------------
    def capture_decode(self) -> None:
        """Capture one decode step as a CUDA graph; later `decode_one_token` calls replay
        it. Triton backend on CUDA only. Resets the cache (capture writes positions 0..)."""
        self._graphs["decode"] = self._capture(
            1, lambda tok, pos: self._forward_at(tok, pos, return_hidden=False))

    def capture_score(self, n_tokens: int) -> None:
        """Capture the chunk-scoring forward of `n_tokens` tokens (final hidden states) as a
        CUDA graph; `score_chunk(..., return_hidden=True)` with that many tokens replays it.
        Resets the cache."""
        self._graphs[("score", n_tokens)] = self._capture(
            n_tokens, lambda tok, pos: self._forward_at(tok, pos, return_hidden=True))

    def capture_prefill(self, buckets=PREFILL_BUCKETS, hidden: bool = False) -> None:
        """Capture the prompt prefill for each bucket size b (those that fit the cache):
        b tokens at a device start position, the logits (or, `hidden`, the final-normed
        hidden state) of one row chosen through a static index. `prefill` (`prefill_hidden`)
        of n tokens then replays the smallest bucket b >= n, the prompt padded with copies
        of its last token (whose K/V, past the prompt, are never read): one launch instead
        of ~10 per layer from Python. Longer prompts run eagerly. Resets the cache."""
        check_buckets(buckets)
        if not buckets:
            raise ConfigError("buckets is empty: give at least one prompt length")
        for b in sorted(set(buckets)):
            if b > self.max_seq_len:
                continue
            row = torch.zeros(1, dtype=torch.int64, device=self.device)
            g = self._capture(b, lambda tok, pos, row=row: forward(
                self.config, self.weights, self.ops, tok, pos, self.cache, self.cos, self.sin,
                return_hidden=hidden, rows=row))
            g["row"] = row
            self._graphs[("prefill", b, hidden)] = g

    def capture_steps(self, n_steps: int) -> None:
        """Capture n greedy decode steps (forward, argmax, feed back) as ONE CUDA graph;
        `decode_steps(token, n_steps)` replays it: one launch and no host work per token.
        Resets the cache."""
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ConfigError(f"n_steps must be an int >= 1, got {n_steps!r}")

        self._graphs[("steps", n_steps)] = self._capture(
            1, lambda tok, pos: self._greedy_steps(tok, pos, n_steps), n_cache=n_steps)

    def _greedy_steps(self, tok: torch.Tensor, pos: torch.Tensor, n_steps: int) -> torch.Tensor:
        """The body of `capture_steps`: n greedy steps from token [1] at device position
        pos [1]; returns [n + 1] (tok and its successors). Nothing is read on the host."""
        toks = [tok]
        # every step's position in one kernel; each step reads a [1] view of it
        all_pos = pos + torch.arange(n_steps, device=pos.device)                  # [n]
        for i in range(n_steps):
            logits = self._forward_at(toks[-1], all_pos[i:i + 1], return_hidden=False)
            toks.append(torch.argmax(logits, dim=-1))                               # [1]
        return torch.cat(toks)                                                      # [n+1]

    def _forward_at(self, tok: torch.Tensor, pos: torch.Tensor, return_hidden: bool):
        """The forward with a device-tensor start position (nothing read on the host)."""
        return forward(self.config, self.weights, self.ops, tok, pos, self.cache,
                       self.cos, self.sin, return_hidden=return_hidden)

    def _capture(self, n_tokens: int, body, n_cache: int | None = None) -> dict:
        """Capture body(token_buffer [n_tokens], pos [1]) -> output as a CUDA graph over
        static input buffers; it may write cache positions [0, n_cache)."""
        if not self.can_capture:
            raise ConfigError("CUDA graphs need device='cuda' and backend='triton' "
                              f"(this model: {self.device}, {self.backend})")
        with self.reserved():
            return self._capture_reserved(n_tokens, body, n_cache)

    def _capture_reserved(self, n_tokens: int, body, n_cache: int | None) -> dict:
        self.cache.check_fits(0, n_tokens if n_cache is None else n_cache)
        tok = torch.zeros(n_tokens, dtype=torch.int64, device=self.device)
        pos = torch.zeros(1, dtype=torch.int64, device=self.device)   # start, a device scalar

        with torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):       # warm up: compile kernels, settle allocations
                for _ in range(2):
                    body(tok, pos)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            # its own memory pool: a shared pool could hand one graph's freed intermediates
            # to another graph's output, which the first graph's replay would overwrite
            with torch.cuda.graph(graph):
                out = body(tok, pos)
        self.cache.reset()
        return {"graph": graph, "token": tok, "pos": pos, "out": out}

    def _replay(self, g: dict, tokens: torch.Tensor, start: int,
                advance: int | None = None) -> torch.Tensor:
        """Replay a captured graph on `tokens` at `start`; the cache grows by `advance`
        positions (default: the number of input tokens)."""
        n = g["token"].shape[0]
        advance = n if advance is None else advance
        if start > self.cache.length:
            raise ValueError(f"start {start} is past the cache length {self.cache.length}")
        self.cache.check_fits(start, advance)
        g["token"].copy_(tokens.reshape(n))
        g["pos"].fill_(start)                # a fill kernel: no host sync
        g["graph"].replay()
        self.cache.length = start + advance
        return g["out"]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [T, d] -> fp32 logits [T, V] (the lm_head)."""
        return torch.nn.functional.linear(hidden, self.weights["lm_head"]).float()

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    # ---- public API -------------------------------------------------------------------
    def score(self, token_ids) -> torch.Tensor:
        """fp32 logits [T, V] of a fresh sequence (the cache is reset first)."""
        tokens = self.as_tokens(token_ids)
        self.cache.check_fits(0, tokens.numel())
        with self.reserved():
            self.cache.reset()
            return self.forward(tokens, 0)

    def generate(self, token_ids, max_new_tokens: int = 32, eos_token_ids=None,
                 stop_at_eos: bool = True) -> list[int]:
        """Greedy continuation of a fresh sequence: the new tokens only, EOS not included.
        Decodes through `stream_greedy` (on CUDA one step stays in flight while the host
        reads the last token: no idle GPU between steps, no wait for work past an EOS)."""
        if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                or max_new_tokens < 1):
            raise RequestError("max_new_tokens must be an int >= 1, got "
                               f"{describe_arg(max_new_tokens)}")
        if eos_token_ids is not None and (
                not isinstance(eos_token_ids, (list, tuple, set, frozenset))
                or any(isinstance(e, bool) or not isinstance(e, int) for e in eos_token_ids)):
            raise RequestError("eos_token_ids must be a list of ints (or None: the model's own), "
                               f"got {describe_arg(eos_token_ids)}")
        if not isinstance(stop_at_eos, bool):
            raise RequestError("stop_at_eos must be True or False, got "
                               f"{describe_arg(stop_at_eos)}")
        tokens = self.as_tokens(token_ids)
        n = tokens.numel()
        if n + max_new_tokens - 1 > self.max_seq_len:
            raise ContextOverflowError(
                f"prompt of {n} tokens + {max_new_tokens} new tokens needs "
                f"{n + max_new_tokens - 1} cache positions, the cache holds {self.max_seq_len}; "
                "shorten the prompt, lower max_new_tokens or load with a larger max_seq_len")
        eos = set(self.eos_token_ids if eos_token_ids is None else eos_token_ids) \
            if stop_at_eos else set()
        with self.reserved():
            self.cache.reset()
            first = torch.argmax(self.prefill(tokens), dim=-1).reshape(1)   # [1], not fed
            out: list[int] = []
            for t in self.stream_greedy(first, max_new_tokens):
                if t in eos:
                    break
                out.append(t)
            return out

    # the host side of `stream_greedy` on CUDA (hooks: the tests drive the same ordering
    # on CPU with plain tensors and events that are always complete)
    @property
    def _steps_overlap(self) -> bool:
        return self.device.type == "cuda"

    def _host_tokens(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, pin_memory=True)

    def _new_event(self):
        return torch.cuda.Event()

    def stream_greedy(self, first: torch.Tensor, n: int):
        """Yields n greedy tokens as host ints: `first` ([1] on the device, chosen but not
        fed) and its n - 1 successors; feeds all but the last (the cache grows by n - 1).

        On CUDA the next decode step (a graph replay when captured) is launched before the
        host waits for the current token, whose copy to pinned memory is its own event:
        the GPU never idles on the host, and a consumer that stops (EOS, a stop string)
        leaves at most one step running, which it does not wait for. Elsewhere (CPU) the
        steps simply run one after another."""
        if n < 1:
            return
        self.cache.check_fits(self.cache.length, n - 1)
        cur = first.reshape(1)
        if not self._steps_overlap:
            for i in range(n):
                yield int(cur)
                if i < n - 1:
                    cur = torch.argmax(self.decode_one_token(cur), dim=-1).reshape(1)
            return
        host = self._host_tokens(n)

        def stage(i: int, tok: torch.Tensor):
            host[i:i + 1].copy_(tok, non_blocking=True)
            ev = self._new_event()
            ev.record()
            return ev
        ev = stage(0, cur)
        for i in range(1, n):
            cur = torch.argmax(self.decode_one_token(cur), dim=-1).reshape(1)   # step in flight
            nxt = stage(i, cur)
            ev.synchronize()                                  # token i - 1 only
            yield int(host[i - 1])
            ev = nxt
        ev.synchronize()
        yield int(host[n - 1])


def check_buckets(buckets) -> None:
    """Prefill bucket sizes: a list / tuple of positive ints (empty: none)."""
    if (not isinstance(buckets, (list, tuple))
            or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets)):
        raise ConfigError("prefill buckets must be a list or tuple of positive ints (prompt "
                          f"lengths), got {buckets!r}")


# 4%: about three times the measured bf16 difference of two correct paths (1.3%, below)
TUNING_MAX_REL_RMS = 0.04


def _logits_disagree(ref: torch.Tensor | None, out: torch.Tensor) -> str | None:
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


def parse_device(device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a torch.device of those types, usable here."""
    try:
        dev = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {describe_arg(device)}: use 'cpu', 'cuda' or "
                          "'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use "
                              "device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(dev)!r}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def _resolve(cfg: ModelConfig, device, dtype, max_seq_len, backend, max_batch_size=1):
    device = parse_device(device)
    dtype = cfg.dtype if dtype is None else parse_dtype(dtype)
    if max_seq_len is None:
        max_seq_len = min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if cfg.sliding_window is not None:
            max_seq_len = min(max_seq_len, cfg.sliding_window)
    if (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
            or not 1 <= max_seq_len < 2 ** 40):
        raise ConfigError(f"max_seq_len must be a positive int (KV cache positions, below "
                          f"2**40), got {describe_arg(max_seq_len)}")
    cfg.check_context(max_seq_len)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_batch_size(max_batch_size)
    # weights + cache + RoPE, before any is made
    check_fits(cfg, device, dtype, max_seq_len, n_slots=max_batch_size)
    return device, dtype, max_seq_len


def check_batch_size(max_batch_size) -> int:
    if (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
            or not 1 <= max_batch_size <= MAX_BATCH_SIZE):
        raise ConfigError(f"max_batch_size must be an int in [1, {MAX_BATCH_SIZE}] (requests "
                          f"decoded together), got {describe_arg(max_batch_size)}")
    return max_batch_size


def build_model(cfg: ModelConfig, weights: dict, device, dtype, max_seq_len: int,
                backend: str = "torch", path: str = "", max_batch_size: int = 1) -> Model:
    """A Model around already loaded (fused, engine-named) weights: allocates the cache
    (`max_batch_size` slots) and RoPE tables. `load_model` uses it; benchmarks use it with
    random weights."""
    check_batch_size(max_batch_size)
    check_fits(cfg, device, dtype, max_seq_len, weights_loaded=True, n_slots=max_batch_size)
    ops = _make_ops(backend, cfg, device)
    cache = StaticKVCache.allocate(cfg.num_layers, cfg.num_kv_heads, max_seq_len, cfg.head_dim,
                                   dtype, device, n_slots=max_batch_size)
    cos, sin = rope_tables(cfg, max_seq_len, device)
    return Model(path=path, config=cfg, weights=weights, cache=cache, cos=cos, sin=sin,
                 ops=ops, device=device, dtype=dtype)


def checkpoint_path(path) -> str:
    """A checkpoint folder given as str or os.PathLike (ConfigError for anything else)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a checkpoint folder path (str or os.PathLike) is expected, got "
                          f"{describe_arg(path)}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise ConfigError("give the checkpoint folder as text (str), not bytes: decode it with "
                          "os.fsdecode")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"the checkpoint folder's path {path!r} is not valid UTF-8 (bytes "
                          "from another encoding); the safetensors reader needs a UTF-8 path: "
                          "rename the folder or link it under a UTF-8 name") from None
    return path


def load_model(path, device="cpu", dtype=None, max_seq_len: int | None = None,
               backend: str = "torch", max_batch_size: int = 1) -> Model:
    """Load a Llama / Qwen2 / Mistral safetensors checkpoint folder into the engine.

    dtype: None keeps the checkpoint's dtype; else torch.float32 / bfloat16 / float16.
    max_seq_len: KV cache length (default min(max_position_embeddings, 4096)).
    backend: "torch" (reference, runs anywhere) or "triton" (the fused kernels).
    max_batch_size: KV cache slots, the most sequences a WSD engine runs together.
    """
    path = checkpoint_path(path)
    cfg = ModelConfig.from_pretrained(path)
    device, dtype, max_seq_len = _resolve(cfg, device, dtype, max_seq_len, backend,
                                          max_batch_size)
    _make_ops(backend, cfg, device)          # fail on a bad backend before reading weights
    weights = load_weights(path, cfg, device, dtype)
    return build_model(cfg, weights, device, dtype, max_seq_len, backend, path, max_batch_size)


def random_model(cfg: ModelConfig, device="cpu", dtype=torch.bfloat16, max_seq_len: int = 4096,
                 backend: str = "torch", seed: int = 0, max_batch_size: int = 1) -> Model:
    """A model of cfg's shapes with random weights made on the device (never zeros):
    for speed measurements at real shapes without a checkpoint. No tokenizer."""
    from .loader import expected_shapes, _fuse
    device, dtype, max_seq_len = _resolve(cfg, device, dtype, max_seq_len, backend,
                                          max_batch_size)
    g = torch.Generator(device=device).manual_seed(seed)
    raw = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:   # ~ 1/sqrt(fan_in) so activations stay O(1) through the layers
            t = torch.randn(shape, generator=g, device=device) * (shape[-1] ** -0.5)
        raw[name] = t.to(dtype)
    return build_model(cfg, _fuse(raw, cfg), device, dtype, max_seq_len, backend,
                       max_batch_size=max_batch_size)
