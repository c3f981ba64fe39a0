"""One model on one device: weights, static KV cache, RoPE tables and the phases that run
it — `prefill` / `decode_one_token` for one sequence in slot 0, `prefill_rows` /
`decode_rows` / `score_rows` / `score_switch` for several rows each in its own slot — plus
the public `score` / `generate`. CUDA graphs of the phases: `graphs.py`; the one-token
kernel choice: `tuning.py`.
"""
from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass, field

import torch

from . import graphs as cudagraphs
from .cache import StaticKVCache
from .config import ModelConfig, describe_arg
from .errors import ConfigError, ContextOverflowError, RequestError, TensorParallelError
from .model import forward, forward_rows as _forward_rows, softcap_logits
from .parallel import mirrored
from .rows import RowBatch, to_device
from .sharing import CacheOwner, CacheResidency
from .switch import first_pass_rows
from .tokenization import has_tokenizer, load_tokenizer, tokenizer_eos_ids

class _Parked:
    """Rank 0's handle of a parked copy on a tensor-parallel model: when it goes, every
    rank's copy goes (rank 0's at once, the workers' with the next call)."""

    __slots__ = ("key", "__weakref__")

    def __init__(self, key: int):
        self.key = key


class _TPCache:
    """What `sharing.CacheResidency` parks and restores on a tensor-parallel model: every
    rank's cache together."""

    def __init__(self, model: "Model"):
        self._model = model

    def snapshot(self) -> _Parked:
        m = self._model
        key = m.tp.new_key()
        m.park_cache(key)
        handle = _Parked(key)
        weakref.finalize(handle, m.forget_parked, key)
        return handle

    def restore(self, handle: _Parked) -> None:
        self._model.unpark_cache(handle.key)


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
    # captured CUDA graphs by kind, each a dict of its static buffers (see graphs.py)
    graphs: dict = field(default_factory=dict)
    # the one-token kernel choice: set by set_decode_kernels (a non-None value) or by
    # tuning.tune_decode_kernels, whose measurements stay in decode_tuning
    _kernels_chosen: bool = False
    decode_tuning: dict | None = None
    # who may use the cache now: the lock, the resident sequence, parked ones
    _residency: CacheResidency = field(default_factory=CacheResidency, repr=False)
    # tensor parallelism (parallel.TPGroup): this process's rank of a split model; None
    # for a whole model. `config` is then this rank's (its heads and MLP rows).
    tp: object = None
    _tp_parked: dict = field(default_factory=dict, repr=False)   # key -> cache snapshot
    # host memory around loading (bytes: "before", "rss" after, "peak" of the process)
    load_memory: dict | None = None

    # ---- sharing ---------------------------------------------------------------------
    def reserved(self, owner: CacheOwner | None = None):
        """Context manager: hold this model (its cache) for `owner`'s sequence. Waits for
        other threads; parks another owner's unfinished sequence and puts `owner`'s back
        (see `sharing`). No owner: a one-shot use whose sequence is not kept."""
        return self._residency.reserved(self.cache if self.tp is None else _TPCache(self),
                                        owner)

    @property
    def lock(self):
        """The model's re-entrant lock, held while a thread uses its cache (`reserved`)
        and, on a tensor-parallel model, through each call to the ranks."""
        return self._residency.lock

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
        return bool(self.graphs)

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
    @mirrored
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, return_hidden: bool = False,
                last_only: bool = False, rows=None) -> torch.Tensor:
        """Tokens [T] at positions start.. against cache [0, start); sets cache length.
        Logits (or final hidden states) of every row, the last (`last_only`) or `rows`."""
        if start > self.cache.length:
            raise ValueError(f"start {start} is past the cache length {self.cache.length}")
        rows = slice(-1, None) if last_only else rows
        return forward(self.config, self.weights, self.ops, tokens, start, self.cache,
                       self.cos, self.sin, return_hidden=return_hidden, rows=rows,
                       comm=self.comm)

    def forward_at(self, tokens: torch.Tensor, pos: torch.Tensor, return_hidden: bool = False,
                   rows=None) -> torch.Tensor:
        """`forward` from a device start position pos [1] int64 (a graph body: nothing is
        read on the host, and the caller keeps the cache length)."""
        self._inside_a_call("forward_at")
        return forward(self.config, self.weights, self.ops, tokens, pos, self.cache, self.cos,
                       self.sin, return_hidden=return_hidden, rows=rows, comm=self.comm)

    @torch.inference_mode()
    def forward_rows(self, tokens: torch.Tensor, rb: RowBatch, return_hidden: bool = False,
                     rows=None) -> torch.Tensor:
        """One forward over the rows `rb` describes (see `model.forward_rows`): writes their
        K/V, the caller keeps the slots' lengths. A decode batch whose RowBatch lives on the
        device only (graphs.py) reads nothing on the host."""
        self._inside_a_call("forward_rows")
        return _forward_rows(self.config, self.weights, self.ops, tokens, rb, self.cache,
                             self.cos, self.sin, return_hidden=return_hidden, rows=rows,
                             comm=self.comm)

    @mirrored
    def prefill(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill slot 0 with a prompt (from position `start`); logits of the last token [V].
        Through a captured prefill graph when one fits (`capture_prefill`), else eagerly."""
        if start > self.cache.length:
            raise ValueError(f"start {start} is past the cache length {self.cache.length}")
        self.cache.check_fits(start, tokens.shape[0])
        out = cudagraphs.replay_prefill(self, tokens, start)
        if out is None:
            return self.forward(tokens, start, last_only=True)[0]
        self.cache.length = start + tokens.shape[0]
        return out

    @mirrored
    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """One token [1] at slot 0's length; its logits [V] (a view of a static buffer when
        the step is graph-captured, `capture_decode`: use it before the next step)."""
        start = self.cache.length
        self.cache.check_fits(start, 1)
        out = cudagraphs.replay_decode(self, token, start)
        if out is None:
            return self.forward(token, start)[0]
        self.cache.length = start + 1
        return out[0]

    # ---- batched phases: several sequences, each in its own cache slot ---------------
    @mirrored
    def run_rows(self, tokens: torch.Tensor, slots, counts, return_hidden: bool = False,
                 last_only: bool = False) -> torch.Tensor:
        """One eager forward over several rows: row b appends counts[b] tokens (consecutive
        in `tokens` [T]) to cache slot slots[b] at its current length. Returns fp32 logits
        (or final-normed hidden states) of every token [T, .], or of each row's last token
        [B, .] (`last_only`). ContextOverflowError (nothing written) if a row does not fit."""
        lengths = self.cache.lengths
        starts = [lengths[s] for s in slots]
        for p0, n in zip(starts, counts):
            self.cache.check_fits(p0, n)
        rb = RowBatch.build(slots, starts, counts, self.device)
        out = self.forward_rows(tokens, rb, return_hidden=return_hidden,
                                rows=rb.last if last_only else None)
        for s, p0, n in zip(slots, starts, counts):
            lengths[s] = p0 + n
        return out

    @mirrored
    def prefill_rows(self, prompts: list[torch.Tensor], slots, hidden: bool = False) -> torch.Tensor:
        """Empty slots filled with prompts (each [n_b] on the device), one forward: the
        last token's logits [B, V] (or final hidden states [B, d] with `hidden`)."""
        for s in slots:
            self.cache.reset(s)
        return self.run_rows(torch.cat(prompts), slots, [p.shape[0] for p in prompts],
                             return_hidden=hidden, last_only=True)

    @mirrored
    def decode_rows(self, tokens: torch.Tensor, slots) -> torch.Tensor:
        """One token per row (tokens [B] on the device) at each slot's length: logits
        [B, V]. Replays the smallest batched decode graph of >= B rows when one is captured
        (`capture_decode_rows`; then a view of its static output: copy it before the next
        step), else one eager forward."""
        lengths = self.cache.lengths
        starts = [lengths[s] for s in slots]
        for p0 in starts:
            self.cache.check_fits(p0, 1)
        out = cudagraphs.replay_rows(self, tokens, slots, starts)
        if out is None:
            return self.run_rows(tokens, slots, [1] * len(slots))
        for s, p0 in zip(slots, starts):
            lengths[s] = p0 + 1
        return out

    @mirrored
    def score_rows(self, tokens: torch.Tensor, slots, counts) -> torch.Tensor:
        """Chunks of another model's tokens, one per row, appended to the rows' slots (the
        cross-model prefix prefill): final hidden states of every token [T, d]."""
        return self.run_rows(tokens, slots, counts, return_hidden=True)

    @mirrored
    def truncate_slot(self, slot: int, length: int) -> None:
        """Keep a slot's positions [0, length): O(1)."""
        self.cache.truncate(length, slot)

    @mirrored
    def release_slot(self, slot: int) -> None:
        """A finished row's slot is free again: O(1)."""
        self.cache.reset(slot)

    @mirrored
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
        float64 rule. Tensor-parallel: each rank scores its vocabulary shard and the ranks
        exchange four floats per token (`_score_switch_sharded`)."""
        if hidden.shape[0] == 0 or not counts or sum(counts) != hidden.shape[0]:
            raise ValueError(f"score_switch: counts {list(counts)} must be non-empty and add up "
                             f"to the {hidden.shape[0]} hidden rows (at least one)")
        if self.tp is not None:
            return self._score_switch_sharded(hidden, ids, counts, carry, n_prev, window,
                                              log_gamma)
        if self.backend == "triton":
            from .kernels.switch_score import switch_score_rows
            cu = to_device([0] + list(counts), hidden.device).cumsum(0)   # no host sync
            out = switch_score_rows(hidden, self.weights["lm_head"], ids, cu, carry, n_prev,
                                    window, log_gamma, softcap=self.config.final_softcap)
            return out.logp, out.first
        logits = self.logits(hidden)                                     # [T, V] fp32
        logp = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
        return logp, first_pass_rows(logp, counts, carry, n_prev, window, log_gamma)

    def _score_switch_sharded(self, hidden, ids, counts, carry, n_prev, window, log_gamma):
        """score_switch on a vocabulary shard: per token this shard's max logit, sum of
        exp(logit - max), best logit (and its global index) and the draft token's logit
        (0 where another shard owns it) — [4, T] floats — all-gathered, then merged into
        log p and the rule, the same on every rank."""
        comm, w = self.comm, self.weights["lm_head"]
        if self.backend == "triton":
            from .kernels.switch_score import (switch_score_partials,
                                               switch_window_rows_from_partials)
            part, idx = switch_score_partials(hidden, w, ids, comm.v0,
                                              softcap=self.config.final_softcap)
            parts = comm.all_gather(part).transpose(0, 1).contiguous()     # [4, N, T]
            cu = to_device([0] + list(counts), hidden.device).cumsum(0)
            out = switch_window_rows_from_partials(parts, comm.all_gather(idx), cu, carry,
                                                   n_prev, window, log_gamma)
            return out.logp, out.first
        logits = self._local_logits(hidden)                              # [T, V_r]
        m, best = logits.max(dim=-1)
        s = torch.exp(logits - m[:, None]).sum(-1)
        local = ids - comm.v0
        own = (local >= 0) & (local < logits.shape[1])
        tgt = logits.gather(1, torch.where(own, local, 0)[:, None])[:, 0]
        tgt = torch.where(own, tgt, torch.zeros_like(tgt))
        parts = comm.all_gather(torch.stack([m, s, tgt]))                 # [N, 3, T]
        M = parts[:, 0].max(dim=0).values
        lse = M + torch.log((parts[:, 1] * torch.exp(parts[:, 0] - M)).sum(0))
        logp = parts[:, 2].sum(0) - lse
        return logp, first_pass_rows(logp, counts, carry, n_prev, window, log_gamma)

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap_logits(self.config,
                              torch.nn.functional.linear(hidden, self.weights["lm_head"]).float())

    @mirrored
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [T, d] -> fp32 logits [T, V] (the lm_head; Gemma-2's
        final soft-cap too; gathered from the vocabulary shards when tensor-parallel)."""
        out = self._local_logits(hidden)
        return out if self.tp is None else self.comm.gather_vocab(out)

    @mirrored
    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    @mirrored
    def reset_cache(self, slot: int | None = None) -> None:
        """Empty one slot, or every slot (None): O(1)."""
        self.cache.reset(slot)

    # ---- tensor parallelism -------------------------------------------------------------
    def _inside_a_call(self, what: str) -> None:
        """forward_at / forward_rows are steps of other phases: on a split model only those
        phases reach the other ranks (alone, rank 0 would wait for them forever)."""
        if self.tp is not None and self.tp.call_depth == 0:
            raise TensorParallelError(f"{what} is a step inside another phase and cannot be "
                                      "called alone on a tensor-parallel model; call run_rows "
                                      "(or forward, prefill, decode_rows, ...) instead")

    def in_use_here(self) -> bool:
        """Whether this thread is inside a use of this model (holds it, or is inside one
        of its calls to the ranks): what it does to the model must then wait."""
        return self._residency.held_here() or (self.tp is not None and self.tp.call_depth > 0)

    @property
    def comm(self):
        """This rank's collectives (`parallel.Collectives`), None for a whole model."""
        return None if self.tp is None else self.tp.comm

    @property
    def tensor_parallel(self) -> int:
        """How many ranks the model is split over (1: whole)."""
        return 1 if self.tp is None else self.tp.world

    def close(self) -> None:
        """A tensor-parallel model: stop its worker processes (then unusable: calls raise
        TensorParallelError). A whole model: nothing to do. Idempotent."""
        if self.tp is not None:
            self.tp.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @mirrored
    def park_cache(self, key: int) -> None:
        """Every rank keeps a copy of its cache under `key` (sharing: a sequence parked)."""
        self._tp_parked[key] = self.cache.snapshot()

    @mirrored
    def unpark_cache(self, key: int) -> None:
        """Every rank puts its copy `key` back (and drops it)."""
        self.cache.restore(self._tp_parked.pop(key))

    @mirrored
    def rank_load_memory(self) -> list[dict]:
        """Per rank (rank order): host memory when its load began ("before"), after it
        ("rss") and the process's peak ("peak"), in bytes; a whole model: one entry."""
        keys = ("before", "rss", "peak")
        mine = [int((self.load_memory or {}).get(k, 0)) for k in keys]
        if self.tp is None:
            return [dict(zip(keys, mine))]
        got = self.comm.all_gather(torch.tensor(mine, dtype=torch.int64, device=self.device))
        return [dict(zip(keys, row)) for row in got.tolist()]

    def forget_parked(self, key: int) -> None:
        """Rank 0: copy `key`'s handle is gone; drop this rank's copy now and the workers'
        with the next call (this may run inside a garbage collection: it sends nothing)."""
        self._tp_parked.pop(key, None)
        self.tp.drop_later(key)

    def drop_parked(self, keys) -> None:
        """Copies whose owner is gone (a worker, told by rank 0)."""
        for k in keys:
            self._tp_parked.pop(k, None)

    # ---- one-token kernel options (triton backend; chosen on the GPU by tuning.py) -----
    @mirrored
    def set_decode_kernels(self, fused_gemv: bool | None = None, pdl: bool | None = None,
                           chosen: bool = True) -> None:
        """Choose the one-token (decode) kernels of the triton backend; None leaves a
        setting as it is. fused_gemv: every one-token matmul through the `gemv` kernel with
        the RMSNorm / SwiGLU / logits fused in (5 launches per layer). pdl: launch them with
        programmatic dependent launch (sm_90+ GPUs; a no-op elsewhere). Captured graphs keep
        the kernels they were captured with, so set this before capturing (ConfigError
        otherwise: call `clear_graphs()` first). chosen=False: a trial (tuning), which
        leaves `decode_kernels_chosen` as it is."""
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
        if self.graphs and any(getattr(self.ops, k) != v for k, v in want.items()):
            raise ConfigError("this model has captured CUDA graphs, which keep the kernels "
                              "they were captured with; call clear_graphs() first, then "
                              "capture again")
        for k, v in want.items():
            setattr(self.ops, k, v)
        self._kernels_chosen = self._kernels_chosen or chosen

    @property
    def decode_kernels(self) -> dict:
        """The one-token kernel settings now: {"fused_gemv": bool, "pdl": bool}."""
        return {k: bool(getattr(self.ops, k, False)) for k in ("fused_gemv", "pdl")}

    @property
    def decode_kernels_chosen(self) -> bool:
        """Whether the one-token kernels were set (`set_decode_kernels` with a value, or
        `tuning.tune_decode_kernels`): an engine with `tune_kernels=None` leaves such a
        model as it is."""
        return self._kernels_chosen

    # ---- CUDA graphs (graphs.py) ---------------------------------------------------------
    @property
    def can_capture(self) -> bool:
        """CUDA graphs (and kernel tuning) need a CUDA device and the triton backend."""
        return self.device.type == "cuda" and self.backend == "triton"

    @mirrored
    def capture_decode(self) -> None:
        """Capture the one-sequence decode step (`decode_one_token`). Resets the cache."""
        cudagraphs.capture_decode(self)

    @mirrored
    def capture_prefill(self, buckets=cudagraphs.PREFILL_BUCKETS) -> None:
        """Capture the one-sequence prompt prefill per bucket length (`prefill`). Resets
        the cache."""
        cudagraphs.capture_prefill(self, buckets)

    @mirrored
    def capture_decode_rows(self, buckets=cudagraphs.GRAPH_BATCH_SIZES,
                            max_rows: int | None = None) -> list[int]:
        """Capture the batched decode step per batch size (`decode_rows`); returns the
        sizes captured (`graphs.row_graph_sizes`). Resets the cache."""
        return cudagraphs.capture_decode_rows(self, buckets, max_rows)

    @mirrored
    def clear_graphs(self) -> None:
        """Drop every captured CUDA graph; calls run eagerly until the next capture."""
        cudagraphs.clear_graphs(self)

    # ---- public API -------------------------------------------------------------------
    def score(self, token_ids) -> torch.Tensor:
        """fp32 logits [T, V] of a fresh sequence (the cache is reset first)."""
        tokens = self.as_tokens(token_ids)
        self.cache.check_fits(0, tokens.numel())
        with self.reserved():
            self.reset_cache()
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
            self.reset_cache()
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
