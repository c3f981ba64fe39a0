"""WSD orchestration (DESIGN §2): the online loop over a pilot and a base model.

    prefill pilot(P_pilot(x)); prefill base(P_base(x))
    loop: pilot drafts a chunk of c tokens -> map to base ids -> the base scores the chunk
          with ONE forward that writes its KV cache -> the rule (log p, rolling window)
          -> on a switch at k: base cache := |P_base| + k, first continuation token from
          the row of t_k, the pilot stops; if the pilot ended (EOS / cap): k = n
    base decodes the rest until EOS / stop string / max_new_tokens

The base never re-reads the prefix and the pilot never drafts past the chunk that fires;
the chunk size changes speed only, never the output. Requests run one after another.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .errors import ConfigError, ContextOverflowError, RequestError, TokenizerError, WSDError
from .handoff import DraftHandoff, tokenizers_identical
from .runner import PREFILL_BUCKETS, Model, check_buckets, load_model
from .sampling import Sampler, SamplingParams
from .switch import SwitchState, check_threshold, check_window
from .tokenization import (DEFAULT_STOP, IncrementalDetokenizer, apply_chat_template, decode,
                           find_stop, finish_text, has_tokenizer, normalize_messages,
                           render_base_prompt)


def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(f"{name} must be an integer >= 1, got {v!r}")
    return v


@dataclass(slots=True)
class WSDParams:
    """One request's settings. Sampling fields apply to both models unless `pilot_sampling`
    / `base_sampling` are given. Defaults are the paper's (greedy, w=6, gamma=0.8)."""

    window: int = 6
    threshold: float = 0.8
    draft_max_tokens: int = 512        # pilot tokens
    max_new_tokens: int = 2048         # base tokens, counting the kept draft
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chunk: int = 8                     # pilot tokens per scoring forward (speed only)
    stop: Optional[tuple] = DEFAULT_STOP   # stop strings of the base continuation
    pilot_sampling: Optional[SamplingParams] = None
    base_sampling: Optional[SamplingParams] = None
    # For benchmarks only (they change the output on purpose): run both models to their
    # caps, and/or switch at exactly this k instead of applying the rule (0 = never).
    ignore_eos: bool = False
    force_switch: Optional[int] = None

    def __post_init__(self):
        self.window = check_window(self.window)
        self.threshold = check_threshold(self.threshold)
        _pos_int("draft_max_tokens", self.draft_max_tokens)
        _pos_int("max_new_tokens", self.max_new_tokens)
        _pos_int("chunk", self.chunk)
        if self.force_switch is not None and (isinstance(self.force_switch, bool) or not
                                              isinstance(self.force_switch, int)
                                              or self.force_switch < 0):
            raise RequestError(f"force_switch must be None or an int >= 0, got {self.force_switch!r}")
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        else:
            self.stop = tuple(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}")
        common = SamplingParams(self.temperature, self.top_p, self.top_k, self.seed)
        for name in ("pilot_sampling", "base_sampling"):
            v = getattr(self, name)
            if v is None:
                setattr(self, name, common)
            elif not isinstance(v, SamplingParams):
                raise RequestError(f"{name} must be a SamplingParams, got {type(v).__name__}")


@dataclass
class WSDResult:
    text: str                          # the answer (kept draft + continuation, cut at a stop)
    token_ids: list[int]               # base ids: kept draft + continuation, no EOS
    switch_index: int                  # k: draft tokens kept, in base tokens
    switched: bool                     # did a window pass
    finish_reason: str                 # "eos" | "stop" | "length"
    draft_tokens: int                  # pilot tokens drafted (pilot EOS not counted)
    draft_text: str                    # text of the kept draft
    base_tokens: int                   # continuation tokens written by the base
    prompt_tokens: dict = field(default_factory=dict)   # {"pilot": n, "base": n}
    timings: dict = field(default_factory=dict)         # per-phase seconds
    rollbacks: int = 0                 # cross-tokenizer re-encode rollbacks

    @property
    def tokens_per_second(self) -> float:
        total = self.timings.get("total", 0.0)
        return len(self.token_ids) / total if total > 0 else float("nan")


class _Timer:
    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.t: dict[str, float] = {}

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, t0: float) -> float:
        t1 = self.now()
        self.t[name] = self.t.get(name, 0.0) + (t1 - t0)
        return t1


class WSD:
    """A pilot (small aligned chat model) and a base (strong base model) on one device."""

    def __init__(self, pilot: Model, base: Model, base_template=None, cuda_graphs: bool = False,
                 graph_chunks=(8,), step_graphs: bool = True, fused_gemv: bool | None = None,
                 pdl: bool | None = None, tune_kernels: bool | None = None,
                 prefill_buckets=PREFILL_BUCKETS):
        """cuda_graphs: capture, once per engine, each model's decode step and the base's
        chunk-scoring forward for each size in `graph_chunks` (CUDA + triton backend);
        other chunk sizes run eagerly. With `step_graphs` also the pilot's greedy n-step
        decode for those sizes: a greedy drafting chunk is then one replay (sampled
        requests replay the one-step graph; the base's continuation streams through its
        one-step graph with the next step in flight). And both prompt prefills for each
        length in `prefill_buckets` (a prompt runs in the smallest bucket that holds it,
        padded; longer prompts, or `prefill_buckets=()`, prefill eagerly).
        fused_gemv / pdl (triton backend; None keeps each model's setting): the one-token
        kernels of both models (`Model.set_decode_kernels`), set before any capture.
        tune_kernels: time the one-token kernel choices on this GPU and keep the fastest
        per model (`Model.tune_decode_kernels`, before capture; predicted a few seconds
        per model, not yet measured on a GPU).
        None (default): with cuda_graphs, for each model whose kernels nobody chose (no
        fused_gemv / pdl given here, no `set_decode_kernels` on it, no graphs captured on
        it yet); False: never.
        Models without tokenizers make a token-level engine: `generate_ids` only (no
        templates, stop strings or text)."""
        if pilot.device != base.device:
            raise RequestError(f"pilot is on {pilot.device} and base on {base.device}; load both "
                               "on the same device")
        self.pilot, self.base, self.base_template = pilot, base, base_template
        has_tok = [has_tokenizer(m.path) or m._tokenizer is not None for m in (pilot, base)]
        if has_tok[0] != has_tok[1]:
            raise TokenizerError("only one of pilot and base has tokenizer files; give both "
                                 "(text prompts) or neither (token-level generate_ids)")
        self.text_mode = has_tok[0]
        self.identity = (not self.text_mode
                         or tokenizers_identical(pilot.tokenizer, base.tokenizer))
        if self.identity and pilot.config.vocab_size > base.config.vocab_size:
            # same tokenizer; ids the pilot can emit must exist in the base's embedding
            raise RequestError("pilot and base share a tokenizer but the pilot's vocab_size "
                               f"({pilot.config.vocab_size}) exceeds the base's "
                               f"({base.config.vocab_size})")
        self.pilot_eos = set(pilot.eos_token_ids)
        self.base_eos = set(base.eos_token_ids)
        self.last_result: Optional[WSDResult] = None
        if tune_kernels not in (None, True, False):
            raise ConfigError(f"tune_kernels must be True, False or None, got {tune_kernels!r}")
        check_buckets(prefill_buckets)
        if tune_kernels and (fused_gemv is not None or pdl is not None):
            raise ConfigError("tune_kernels=True chooses fused_gemv and pdl itself; give "
                              "either those settings or tune_kernels=True, not both")
        for m in (pilot, base):
            m.set_decode_kernels(fused_gemv=fused_gemv, pdl=pdl)
        self.kernel_tuning = {}
        for name, m in (("pilot", pilot), ("base", base)):
            if tune_kernels or (tune_kernels is None and cuda_graphs and m.can_capture
                                and not m.decode_kernels_chosen and not m._graphs):
                self.kernel_tuning[name] = m.tune_decode_kernels()
        if cuda_graphs:
            pilot.capture_decode()
            base.capture_decode()
            if prefill_buckets:
                pilot.capture_prefill(prefill_buckets, hidden=False)   # logits: 1st draft token
                base.capture_prefill(prefill_buckets, hidden=True)     # H[0] of the rule
            for c in graph_chunks:
                base.capture_score(c)
                if step_graphs:              # the pilot's greedy drafting chunks
                    pilot.capture_steps(c)

    @classmethod
    def from_pretrained(cls, pilot, base, device="cpu", dtype=None, max_seq_len=None,
                        backend="torch", base_template=None, cuda_graphs=False,
                        graph_chunks=(8,), step_graphs=True, fused_gemv=None,
                        pdl=None, tune_kernels=None, prefill_buckets=PREFILL_BUCKETS) -> "WSD":
        kw = dict(device=device, dtype=dtype, max_seq_len=max_seq_len, backend=backend)
        return cls(load_model(pilot, **kw), load_model(base, **kw), base_template,
                   cuda_graphs=cuda_graphs, graph_chunks=graph_chunks, step_graphs=step_graphs,
                   fused_gemv=fused_gemv, pdl=pdl, tune_kernels=tune_kernels,
                   prefill_buckets=prefill_buckets)

    # ---- public API ----------------------------------------------------------------
    def generate(self, prompt, params: Optional[WSDParams] = None):
        """One prompt (str or messages) -> WSDResult; a list of prompts -> list, in order."""
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(p, str) or (isinstance(p, (list, tuple)) and p) for p in prompt):
            return [self.generate(p, params) for p in prompt]
        run = self._run(prompt, params)
        while True:
            try:
                next(run)
            except StopIteration as stop:
                return stop.value

    def stream(self, prompt, params: Optional[WSDParams] = None) -> Iterator[str]:
        """Yields text pieces as soon as they are final; `last_result` holds the result."""
        return (yield from self._run(prompt, params))

    def generate_ids(self, pilot_prompt_ids, base_prompt_ids,
                     params: Optional[WSDParams] = None) -> WSDResult:
        """Token-level WSD for callers that render prompts themselves (serving stacks,
        benchmarks): the pilot's prompt ids (its chat template applied) and the base's.
        Text fields are empty and stop strings unused when the models have no tokenizer."""
        run = self._run(None, params, ids=(pilot_prompt_ids, base_prompt_ids))
        while True:
            try:
                next(run)
            except StopIteration as stop:
                return stop.value

    # ---- the loop --------------------------------------------------------------------
    def _run(self, prompt, params: Optional[WSDParams], ids=None):
        params = WSDParams() if params is None else params
        if not isinstance(params, WSDParams):
            raise RequestError(f"params must be a WSDParams, got {type(params).__name__}")
        pilot, base = self.pilot, self.base
        if ids is not None:
            p_ids = pilot.as_tokens(ids[0]).tolist()
            b_ids = base.as_tokens(ids[1]).tolist()
        else:
            if not self.text_mode:
                raise TokenizerError("these models have no tokenizers: use generate_ids with "
                                     "prompt token ids")
            messages = normalize_messages(prompt)
            p_ids = apply_chat_template(pilot.tokenizer, messages)
            b_ids = render_base_prompt(base.tokenizer, messages, self.base_template)
        for name, m, n, extra, what in (
                ("pilot", pilot, len(p_ids), params.draft_max_tokens, "draft_max_tokens"),
                ("base", base, len(b_ids), params.max_new_tokens, "max_new_tokens")):
            if n + extra > m.max_seq_len:
                raise ContextOverflowError(
                    f"{name} prompt ({n} tokens) + {what} ({extra}) exceeds the {name} model's "
                    f"KV cache ({m.max_seq_len}); shorten the prompt, lower {what}, or load with "
                    "a larger max_seq_len")
        try:
            return (yield from self._loop(params, p_ids, b_ids))
        except BaseException:
            pilot.cache.reset()
            base.cache.reset()
            raise

    def _loop(self, params: WSDParams, p_ids: list[int], b_ids: list[int]):
        pilot, base = self.pilot, self.base
        dev = base.device
        timer = _Timer(dev)
        t_start = t0 = timer.now()
        P = len(b_ids)
        p_sampler = Sampler(params.pilot_sampling, pilot.device)
        b_sampler = Sampler(params.base_sampling, dev)
        tok = base.tokenizer if self.text_mode else None
        handoff = DraftHandoff(pilot.tokenizer if self.text_mode else None, tok,
                               mode="identity" if self.identity else "text")
        state = SwitchState.from_threshold(params.window, params.threshold)
        force = params.force_switch
        cap = params.max_new_tokens          # the draft is scored up to this many base tokens
        stops = params.stop if tok is not None else ()
        hold = max((len(s) for s in stops), default=1) - 1
        out = _Streamer(tok, hold)
        pilot_eos = set() if params.ignore_eos else self.pilot_eos
        base_eos = set() if params.ignore_eos else self.base_eos

        pilot.cache.reset()
        base.cache.reset()
        p_cur = _Cursor(logits=pilot.prefill(torch.tensor(p_ids, device=pilot.device)))
        t0 = timer.add("pilot_prefill", t0)
        b_h = base.prefill_hidden(torch.tensor(b_ids, device=dev))                # [d]
        t0 = timer.add("base_prefill", t0)

        # H[i]: the base's final hidden state after draft token i (H[0]: the prompt's last),
        # i.e. the row that predicts draft token i + 1. Kept for every scored token (at most
        # max_new_tokens rows) so a rollback or the switch needs no recomputation.
        H = torch.empty(cap + 1, b_h.shape[-1], dtype=b_h.dtype, device=dev)   # [cap+1, d]
        H[0] = b_h
        scored: list[int] = []               # base draft ids scored so far (= handoff.emitted)
        drafted: list[int] = []              # pilot ids
        k: Optional[int] = None
        pilot_done = False
        while k is None and not pilot_done:
            # -- the pilot drafts a chunk: tokens stay on the device, read back once per
            #    chunk; steps past a pilot EOS are discarded (output unchanged)
            n_p = min(params.chunk, params.draft_max_tokens - len(drafted))
            chunk_t, p_cur = _decode_block(pilot, p_sampler, p_cur, n_p,
                                           feed_last=len(drafted) + n_p < params.draft_max_tokens)
            new_p: list[int] = []
            for t in chunk_t.tolist():                       # the chunk's one read-back
                if t in pilot_eos:
                    pilot_done = True
                    break
                new_p.append(t)
            drafted.extend(new_p)
            if len(drafted) == params.draft_max_tokens:
                pilot_done = True
            t0 = timer.add("drafting", t0)
            # -- map to base ids (identity, or the stable re-encode with rollback)
            start, new_b = handoff.push(new_p, final=pilot_done)
            if start < len(scored):          # an already scored token changed: roll back
                state.truncate(start)
                del scored[start:]
            new_b = new_b[:cap - start]
            if new_b:
                # -- ONE base forward over the chunk at its positions (writes the KV cache),
                #    then the rule on log p of each chunk token
                m = len(new_b)
                ids_t = torch.tensor(new_b, device=dev)                          # [m]
                H[start + 1:start + 1 + m] = base.score_chunk(ids_t, P + start,
                                                              return_hidden=True)
                logp = self._draft_logp(H[start:start + m], ids_t, state)        # [m] fp32
                if force is None:
                    k = state.update(logp)   # the rule: one small read-back per chunk
                else:
                    logp.tolist()            # same read-back, the rule replaced (benchmarks)
                    k = force if 0 < force <= start + m and force > start else None
                scored.extend(new_b)
                if k is not None:
                    base.truncate(P + k)     # drop the draft after t_k: O(1)
                t0 = timer.add("scoring", t0)
            if k is None and len(scored) >= cap:
                k = len(scored)              # the draft alone fills max_new_tokens
            if k is None:
                yield from out.feed(scored)
        switched = k is not None
        if k is None:
            k = len(scored)                  # no window passed: keep the whole draft
        kept = scored[:k]
        yield from out.feed(kept)

        # -- the base writes the rest, from the row of t_k
        cont: list[int] = []
        finish = "length"
        draft_chars = len(decode(tok, kept)) if stops else 0
        max_stop = max((len(s) for s in stops), default=0)
        budget = params.max_new_tokens - k
        logits = base.logits(H[k:k + 1])[0] if budget > 0 else None                # [V]

        def accept(t: int) -> str:
            """Book one continuation token; "eos" / "stop" / "length" (go on)."""
            if t in base_eos:
                return "eos"
            cont.append(t)
            if tok is not None:
                seen = len(out.detok.text)
                out.push_cont(t)
                if stops and find_stop(out.detok.text, stops,
                                       max(draft_chars, seen - max_stop)) != -1:
                    return "stop"
            return "length"

        if budget > 0 and b_sampler.params.greedy:
            # greedy: one token at a time with the next step already running on the device
            # (`Model.stream_greedy`); the step in flight at an EOS / stop is not waited for
            first = torch.argmax(logits, dim=-1).reshape(1)
            for t in base.stream_greedy(first, budget):
                finish = accept(t)
                if finish != "length":
                    break
                if tok is not None:
                    yield from out.flush_safe()     # text as soon as it is final
            yield from out.flush_safe()
        cur = _Cursor(logits=logits)
        while len(cont) < budget and finish == "length":
            # sampling: blocks of `chunk` tokens, read back once per block; tokens sampled
            # past an EOS or a stop string are discarded (output unchanged)
            n = min(params.chunk, budget - len(cont))
            block, cur = _decode_block(base, b_sampler, cur, n, feed_last=len(cont) + n < budget)
            for t in block.tolist():                         # the block's one read-back
                finish = accept(t)
                if finish != "length":
                    break
            yield from out.flush_safe()
        t0 = timer.add("continuation", t0)
        if tok is not None:
            text, token_ids, stopped = finish_text(tok, kept, cont, stops)
            if stopped:
                finish = "stop"
            yield from out.finish(text)
        else:
            text, token_ids = "", kept + cont
        timer.t["total"] = t0 - t_start
        res = WSDResult(
            text=text, token_ids=token_ids, switch_index=k, switched=switched,
            finish_reason=finish, draft_tokens=len(drafted),
            draft_text=decode(tok, kept) if tok is not None else "", base_tokens=len(cont),
            prompt_tokens={"pilot": len(p_ids), "base": P}, timings=timer.t,
            rollbacks=handoff.n_rollbacks)
        self.last_result = res
        return res

    def _draft_logp(self, rows: torch.Tensor, ids: torch.Tensor, state: SwitchState) -> torch.Tensor:
        """log p of each draft token under the base: rows [m, d] predict ids [m] -> [m] fp32.

        The triton backend uses the fused kernel (the lm_head is read once for the chunk and
        the [m, V] logits never reach memory); the rule itself is then applied by
        `SwitchState.update` on the m log-probs, one small read-back per chunk."""
        if self.base.backend == "triton":
            from .kernels.switch_score import switch_score
            return switch_score(rows, self.base.weights["lm_head"], ids,
                                state.carry_tensor(rows.device), state.n_scored, state.window,
                                state.log_gamma).logp
        logits = self.base.logits(rows)                                   # [m, V] fp32
        return torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]


@dataclass
class _Cursor:
    """Where a model's decoding stands: the logits [V] of the last fed token, or (greedy
    blocks) the next token, already chosen from them and not yet fed, [1] on the device."""
    logits: Optional[torch.Tensor] = None
    token: Optional[torch.Tensor] = None


def _decode_block(model: Model, sampler: Sampler, cur: _Cursor, n: int,
                  feed_last: bool) -> tuple[torch.Tensor, _Cursor]:
    """Choose n tokens from `cur` on, feeding each back into the model, with no host sync.
    The last one is fed only if `feed_last` (the next block continues from it). Returns
    the tokens [n] on the device and the new cursor.

    Greedy: `Model.decode_steps` (one graph replay when an n-step graph was captured).
    Sampling: one decode step per token (a replay when the step was captured), sampled
    on the device from the seeded generator."""
    if sampler.params.greedy:
        first = cur.token if cur.token is not None else \
            torch.argmax(cur.logits, dim=-1).reshape(1)
        if not feed_last:
            return model.decode_steps(first, n - 1), _Cursor()
        toks = model.decode_steps(first, n)                                 # [n + 1]
        return toks[:n], _Cursor(token=toks[n:])
    logits = cur.logits
    toks = []
    for i in range(n):
        t = sampler.sample(logits).reshape(1)                               # [1] on device
        toks.append(t)
        if i < n - 1 or feed_last:
            logits = model.decode_one_token(t)
    return torch.cat(toks), _Cursor(logits=logits)


class _Streamer:
    """Emits the answer's text as it becomes final: scored draft tokens (the rule cannot
    drop them any more) and continuation tokens, holding back the last `hold` characters
    and trailing whitespace, which a stop string could still cut."""

    def __init__(self, tok, hold: int):
        self.tok, self.hold = tok, hold
        self.detok = IncrementalDetokenizer(tok)
        self.emitted = ""

    def feed(self, ids: list[int]):
        if self.tok is None:                 # token-level engine: no text
            return
        if ids[:len(self.detok.ids)] != self.detok.ids:   # a cross-tokenizer rollback
            self.detok = IncrementalDetokenizer(self.tok)
        self.detok.push(ids[len(self.detok.ids):])
        yield from self.flush_safe()

    def push_cont(self, tok: int):
        self.detok.push([tok])

    def flush_safe(self):
        text = self.detok.text
        end = len(text) - self.hold
        while end > len(self.emitted) and text[end - 1].isspace():
            end -= 1
        if end > len(self.emitted) and text.startswith(self.emitted):
            piece = text[len(self.emitted):end]
            self.emitted += piece
            yield piece

    def finish(self, final_text: str):
        if final_text.startswith(self.emitted) and len(final_text) > len(self.emitted):
            piece = final_text[len(self.emitted):]
            self.emitted += piece
            yield piece
        elif not final_text.startswith(self.emitted):
            raise WSDError("internal error: streamed text is not a prefix of the final text")
