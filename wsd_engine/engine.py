"""WSD: the online loop over a pilot and a base model.

    prefill pilot(P_pilot(x)); prefill base(P_base(x))
    loop: pilot drafts a chunk of c tokens -> map to base ids -> the base scores the chunk
          with ONE forward that writes its KV cache -> the rule (log p, rolling window)
          -> on a switch at k: base cache := |P_base| + k, first continuation token from
          the row of t_k, the pilot stops; if the pilot ended (EOS / cap): k = n
    base decodes the rest until EOS / stop string / max_new_tokens

The base never re-reads the prefix and the pilot never drafts past the chunk that fires;
the chunk size changes speed only, never the output (up to floating-point rounding: a
forward over c tokens sums in another order than one over 1).

Requests run one at a time. An engine may be shared by threads, and streams may be
suspended and interleaved: each step of a request holds both models (`Model.reserved`),
which parks and restores another request's cached sequence when needed, so every request
gives exactly what it gives alone.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .errors import ConfigError, ContextOverflowError, RequestError, TokenizerError
from .handoff import DraftHandoff, tokenizers_identical
from .runner import PREFILL_BUCKETS, Model, check_buckets, load_model
from .sampling import Sampler, SamplingParams
from .sharing import CacheOwner
from .streaming import AnswerText
from .switch import SwitchState, check_threshold, check_window
from .tokenization import (DEFAULT_STOP, apply_chat_template, check_ids_in_vocab, check_text,
                           decode, finish_text, has_tokenizer, is_prompt_list,
                           max_token_chars, normalize_messages, render_base_prompt)


def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(f"{name} must be an integer >= 1, got {v!r}")
    return v


@dataclass(slots=True)
class WSDParams:
    """One request's settings. Sampling fields apply to both models unless `pilot_sampling`
    / `base_sampling` are given. Defaults are the paper's (greedy, w=6, gamma=0.8).
    Validated when made and again when a request starts (fields may be changed between)."""

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
    pilot_sampling: Optional[SamplingParams] = None   # None: the fields above
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
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        self.stop = _check_stops(self.stop)
        SamplingParams(self.temperature, self.top_p, self.top_k, self.seed)   # validates
        for name in ("pilot_sampling", "base_sampling"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, SamplingParams):
                raise RequestError(f"{name} must be a SamplingParams or None, got "
                                   f"{type(v).__name__}")
            if v is not None:                 # validated again: it may have been changed
                setattr(self, name, dataclasses.replace(v))

    def checked(self) -> "WSDParams":
        """A validated copy of the current values (RequestError if any is invalid)."""
        return dataclasses.replace(self)

    @property
    def pilot_params(self) -> SamplingParams:
        return self.pilot_sampling or SamplingParams(self.temperature, self.top_p,
                                                     self.top_k, self.seed)

    @property
    def base_params(self) -> SamplingParams:
        return self.base_sampling or SamplingParams(self.temperature, self.top_p,
                                                    self.top_k, self.seed)


def _check_stops(stop) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise RequestError(f"stop must be a string, a list of strings or None, got "
                           f"{type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise RequestError(f"stop strings must be non-empty strings, got {type(s).__name__}"
                               f"{' (empty)' if s == '' else ''}")
        check_text(s, f"stop string {s[:40]!r}")
    return tuple(stop)


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


@dataclass(eq=False)
class _Run:
    """One request's state while it runs."""
    params: WSDParams
    p_ids: list[int]                   # pilot prompt ids
    b_ids: list[int]                   # base prompt ids
    timer: _Timer
    text: AnswerText
    drafted: list[int] = field(default_factory=list)   # pilot ids (no EOS)
    scored: list[int] = field(default_factory=list)    # base draft ids scored so far
    H: Optional[torch.Tensor] = None   # [cap + 1, d] base hidden states: H[i] predicts t_{i+1}
    k: Optional[int] = None            # the switch point, once known
    switched: bool = False             # a window passed (or the forced switch)
    rollbacks: int = 0
    cont: list[int] = field(default_factory=list)      # continuation ids (no EOS)
    finish: str = "length"


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
        for name, m in (("pilot", pilot), ("base", base)):
            if not isinstance(m, Model):
                raise ConfigError(f"{name} must be a Model (from load_model), got "
                                  f"{type(m).__name__}")
        if pilot is base:
            raise ConfigError("the same Model object was given as pilot and as base; each "
                              "needs its own KV cache: load the checkpoint twice")
        if pilot.device != base.device:
            raise ConfigError(f"pilot is on {pilot.device} and base on {base.device}; load both "
                              "on the same device")
        self.pilot, self.base, self.base_template = pilot, base, base_template
        has_tok = [has_tokenizer(m.path) or m.has_loaded_tokenizer for m in (pilot, base)]
        if has_tok[0] != has_tok[1]:
            raise TokenizerError("only one of pilot and base has tokenizer files; give both "
                                 "(text prompts) or neither (token-level generate_ids)")
        self.text_mode = has_tok[0]
        self.identity = (not self.text_mode
                         or tokenizers_identical(pilot.tokenizer, base.tokenizer))
        if self.identity and pilot.config.vocab_size > base.config.vocab_size:
            # same tokenizer; ids the pilot can emit must exist in the base's embedding
            raise ConfigError("pilot and base share a tokenizer but the pilot's vocab_size "
                              f"({pilot.config.vocab_size}) exceeds the base's "
                              f"({base.config.vocab_size})")
        # the longest text a prompt can have and still fit both caches (checked before
        # tokenizing, so a huge prompt is refused at once)
        self._chars_per_token = (max(max_token_chars(pilot.tokenizer),
                                     max_token_chars(base.tokenizer))
                                 if self.text_mode else 0)
        self.pilot_eos = set(pilot.eos_token_ids)
        self.base_eos = set(base.eos_token_ids)
        self.last_result: Optional[WSDResult] = None
        self._setup_kernels(cuda_graphs, graph_chunks, step_graphs, fused_gemv, pdl,
                            tune_kernels, prefill_buckets)

    def _setup_kernels(self, cuda_graphs, graph_chunks, step_graphs, fused_gemv, pdl,
                       tune_kernels, prefill_buckets) -> None:
        pilot, base = self.pilot, self.base
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
                                and not m.decode_kernels_chosen and not m.has_graphs):
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
    def generate(self, prompt, params=None):
        """One prompt (str or messages) -> WSDResult; a list of prompts -> list, in order
        (params: one WSDParams for all, or a list with one per prompt)."""
        if is_prompt_list(prompt):
            plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompt)
            if len(plist) != len(prompt):
                raise RequestError(f"{len(prompt)} prompts but {len(plist)} params; give one "
                                   "WSDParams for all or one per prompt")
            return [self.generate(p, q) for p, q in zip(prompt, plist)]
        if isinstance(params, (list, tuple)):
            raise RequestError("a list of params needs a list of prompts")
        return self._complete(self._request(prompt, params))

    def stream(self, prompt, params: Optional[WSDParams] = None) -> Iterator[str]:
        """Yields text pieces as soon as they are final; returns the WSDResult (the
        generator's return value; also `last_result`). While it is suspended other
        requests may use the engine: its state is parked and restored, exactly."""
        owner = CacheOwner()
        run = self._request(prompt, params)
        try:
            while True:
                with self._hold(owner):
                    try:
                        piece = next(run)
                    except StopIteration as done:
                        return done.value
                yield piece
        finally:
            owner.release()
            run.close()

    def generate_ids(self, pilot_prompt_ids, base_prompt_ids,
                     params: Optional[WSDParams] = None) -> WSDResult:
        """Token-level WSD for callers that render prompts themselves (serving stacks,
        benchmarks): the pilot's prompt ids (its chat template applied) and the base's.
        Text fields are empty and stop strings unused when the models have no tokenizer."""
        return self._complete(self._request(None, params, ids=(pilot_prompt_ids,
                                                               base_prompt_ids)))

    # ---- one request ---------------------------------------------------------------
    @contextmanager
    def _hold(self, owner: CacheOwner):
        """Both models reserved for `owner` (always in the same order: no deadlock); if
        reserving the second fails, the first is let go."""
        with ExitStack() as stack:
            for m in sorted((self.pilot, self.base), key=id):
                stack.enter_context(m.reserved(owner))
            yield

    def _complete(self, run) -> WSDResult:
        """Run a request to the end while holding both models."""
        owner = CacheOwner(keep=False)
        try:
            with self._hold(owner):
                while True:
                    try:
                        next(run)
                    except StopIteration as done:
                        return done.value
        finally:
            run.close()

    def _request(self, prompt, params, ids=None):
        """The request as a generator (nothing runs before its first step): checks and
        tokenizes, then yields final text pieces and returns the WSDResult."""
        params = WSDParams() if params is None else params
        if not isinstance(params, WSDParams):
            raise RequestError(f"params must be a WSDParams, got {type(params).__name__}")
        params = params.checked()
        return self._steps(prompt, params, ids)

    def _steps(self, prompt, params: WSDParams, ids):
        p_ids, b_ids = self._prompt_ids(prompt, params, ids)
        run = _Run(params=params, p_ids=p_ids, b_ids=b_ids, timer=_Timer(self.base.device),
                   text=AnswerText(self.base.tokenizer if self.text_mode else None,
                                   params.stop))
        t_start = run.timer.now()
        yield from self._draft(run)
        yield from self._continue(run)
        run.timer.t["total"] = run.timer.now() - t_start
        res = self._result(run)
        yield from run.text.finish(res.text)     # the rest; checks the streamed prefix
        return res

    def _prompt_ids(self, prompt, params: WSDParams, ids) -> tuple[list[int], list[int]]:
        """Both prompts as token ids, checked against both caches."""
        pilot, base = self.pilot, self.base
        room = (("pilot", pilot, params.draft_max_tokens, "draft_max_tokens"),
                ("base", base, params.max_new_tokens, "max_new_tokens"))
        for name, m, extra, what in room:
            if extra >= m.max_seq_len:
                raise ContextOverflowError(
                    f"{what}={extra} leaves no room for a prompt in the {name} model's KV cache "
                    f"({m.max_seq_len} positions); lower {what}, or load with a larger "
                    "max_seq_len")
        if ids is not None:
            p_ids, b_ids = pilot.as_tokens(ids[0]).tolist(), base.as_tokens(ids[1]).tolist()
        else:
            if not self.text_mode:
                raise TokenizerError("these models have no tokenizers: use generate_ids with "
                                     "prompt token ids")
            messages = normalize_messages(prompt)
            chars = sum(len(m["content"]) for m in messages)
            for name, m, extra, what in room:
                most = max(m.max_seq_len - extra, 0) * self._chars_per_token
                if chars > most:
                    raise ContextOverflowError(
                        f"the prompt has {chars} characters: more than the {name} model's KV "
                        f"cache ({m.max_seq_len}) can hold with {what}={extra} (at most "
                        f"{most} characters); shorten the prompt, lower {what}, or load with "
                        "a larger max_seq_len")
            p_ids = apply_chat_template(pilot.tokenizer, messages)
            b_ids = render_base_prompt(base.tokenizer, messages, self.base_template)
            if not b_ids:
                raise RequestError("the base prompt rendered as empty text; check base_template")
            check_ids_in_vocab(p_ids, pilot.config.vocab_size, "pilot")
            check_ids_in_vocab(b_ids, base.config.vocab_size, "base")
        for name, m, extra, what in room:
            n = len(p_ids) if name == "pilot" else len(b_ids)
            if n + extra > m.max_seq_len:
                raise ContextOverflowError(
                    f"{name} prompt ({n} tokens) + {what} ({extra}) exceeds the {name} model's "
                    f"KV cache ({m.max_seq_len}); shorten the prompt, lower {what}, or load with "
                    "a larger max_seq_len")
        return p_ids, b_ids

    # ---- drafting and scoring ------------------------------------------------------
    def _draft(self, run: _Run):
        """Until the rule fires or the draft ends: the pilot drafts a chunk, the base
        scores it. Sets run.k / run.switched; yields the draft text that is certain."""
        pilot, base, params = self.pilot, self.base, run.params
        p_sampler = Sampler(params.pilot_params, pilot.device)
        handoff = DraftHandoff(pilot.tokenizer if self.text_mode else None,
                               base.tokenizer if self.text_mode else None,
                               mode="identity" if self.identity else "text")
        state = SwitchState.from_threshold(params.window, params.threshold)
        cap = params.max_new_tokens          # the draft is scored up to this many base tokens
        pilot_eos = set() if params.ignore_eos else self.pilot_eos
        t0 = run.timer.now()
        pilot.cache.reset()
        base.cache.reset()
        p_cur = _Cursor(logits=pilot.prefill(torch.tensor(run.p_ids, device=pilot.device)))
        t0 = run.timer.add("pilot_prefill", t0)
        b_h = base.prefill_hidden(torch.tensor(run.b_ids, device=base.device))     # [d]
        t0 = run.timer.add("base_prefill", t0)
        # H[i]: the base's final hidden state after draft token i (H[0]: the prompt's last),
        # the row that predicts draft token i + 1. Kept for every scored token (at most
        # max_new_tokens rows) so a rollback or the switch needs no recomputation.
        run.H = torch.empty(cap + 1, b_h.shape[-1], dtype=b_h.dtype, device=base.device)
        run.H[0] = b_h
        pilot_done = False
        while True:
            if run.k is not None and handoff.final_count() >= run.k:
                break                        # t_1..t_k can no longer change: the switch stands
            if pilot_done:
                break
            # the pilot drafts a chunk: tokens stay on the device, read back once per
            # chunk; steps past a pilot EOS are discarded (output unchanged)
            n_p = min(params.chunk, params.draft_max_tokens - len(run.drafted))
            chunk_t, p_cur = _decode_block(pilot, p_sampler, p_cur, n_p, feed_last=len(
                run.drafted) + n_p < params.draft_max_tokens)
            new_p = []
            for t in chunk_t.tolist():                       # the chunk's one read-back
                if t in pilot_eos:
                    pilot_done = True
                    break
                new_p.append(t)
            run.drafted.extend(new_p)
            pilot_done = pilot_done or len(run.drafted) == params.draft_max_tokens
            t0 = run.timer.add("drafting", t0)
            # map to base ids (identity, or the stable re-encode with rollback)
            start, new_b = handoff.push(new_p, final=pilot_done)
            if run.k is not None:
                # two tokenizers: a switch point waits until its tokens are final; one
                # changed by the re-encode undoes it, and scoring goes on from there
                if start >= run.k:
                    continue
                run.k, run.switched = None, False
            if start < len(run.scored):      # an already scored token changed: roll back
                state.truncate(start)
                del run.scored[start:]
            new_b = new_b[:cap - start]
            if new_b:
                self._score(run, state, start, new_b)
                t0 = run.timer.add("scoring", t0)
            if run.k is None and len(run.scored) >= cap:
                run.k = len(run.scored)      # the draft alone fills max_new_tokens
            if run.k is None and self.identity:
                # same tokenizer: every scored token will be kept (k >= len(scored)); with
                # two tokenizers a rollback may still change them, so the text waits
                yield from run.text.draft_so_far(run.scored)
        run.rollbacks = handoff.n_rollbacks
        if run.k is None:
            run.k = len(run.scored)          # no window passed: keep the whole draft
        base.truncate(len(run.b_ids) + run.k)    # drop the draft after t_k: O(1)

    def _score(self, run: _Run, state: SwitchState, start: int, new_b: list[int]) -> None:
        """ONE base forward over a chunk of draft tokens at their positions (it writes the
        base's KV cache), then the rule on their log p; truncates the base at a switch."""
        base, params = self.base, run.params
        check_ids_in_vocab(new_b, base.config.vocab_size, "base")
        m, P = len(new_b), len(run.b_ids)
        ids_t = torch.tensor(new_b, device=base.device)                          # [m]
        run.H[start + 1:start + 1 + m] = base.score_chunk(ids_t, P + start, return_hidden=True)
        logp = self._draft_logp(run.H[start:start + m], ids_t, state)            # [m] fp32
        force = params.force_switch
        if force is None:
            k = state.update(logp)           # the rule: one small read-back per chunk
        else:
            state.record(logp)               # same read-back, the rule replaced (benchmarks)
            k = force if start < force <= start + m else None
        run.scored.extend(new_b)
        if k is not None:
            run.k, run.switched = k, True

    def _draft_logp(self, rows: torch.Tensor, ids: torch.Tensor, state: SwitchState) -> torch.Tensor:
        """log p of each draft token under the base: rows [m, d] predict ids [m] -> [m] fp32.

        The triton backend uses the fused kernel (the lm_head is read once for the chunk and
        the [m, V] logits never reach memory); the rule itself is then applied by
        `SwitchState.update` on the m log-probs, one small read-back per chunk."""
        if self.base.backend == "triton":
            from .kernels.switch_score import switch_score
            return switch_score(rows, self.base.lm_head_weight, ids,
                                state.carry_tensor(rows.device), state.n_scored, state.window,
                                state.log_gamma).logp
        logits = self.base.logits(rows)                                   # [m, V] fp32
        return torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]

    # ---- the continuation ----------------------------------------------------------
    def _continue(self, run: _Run):
        """The base writes the rest from the row of t_k, to EOS / a stop / the budget.
        Yields the text as it becomes final."""
        base, params = self.base, run.params
        t0 = run.timer.now()
        kept = run.scored[:run.k]
        yield from run.text.start_continuation(kept)
        budget = params.max_new_tokens - run.k
        if budget <= 0:
            run.timer.add("continuation", t0)
            return
        eos = set() if params.ignore_eos else self.base_eos
        logits = base.logits(run.H[run.k:run.k + 1])[0]                        # [V] fp32

        def ended(t: int) -> bool:
            """Book one continuation token; True when the answer is complete."""
            if t in eos:
                run.finish = "eos"
                return True
            run.cont.append(t)
            run.text.push(t)
            if run.text.done:
                run.finish = "stop"
                return True
            return False

        sampler = Sampler(params.base_params, base.device)
        if sampler.params.greedy:
            # one token at a time with the next step already running on the device
            # (`Model.stream_greedy`); the step in flight at an EOS / stop is not waited for
            first = torch.argmax(logits, dim=-1).reshape(1)
            for t in base.stream_greedy(first, budget):
                if ended(t):
                    break
                yield from run.text.pieces()
        else:
            cur = _Cursor(logits=logits)
            done = False
            while len(run.cont) < budget and not done:
                # blocks of `chunk` tokens, read back once per block; tokens sampled past
                # an EOS or a stop string are discarded (output unchanged)
                n = min(params.chunk, budget - len(run.cont))
                block, cur = _decode_block(base, sampler, cur, n,
                                           feed_last=len(run.cont) + n < budget)
                done = any(ended(t) for t in block.tolist())
                yield from run.text.pieces()
        run.timer.add("continuation", t0)

    def _result(self, run: _Run) -> WSDResult:
        kept, tok = run.scored[:run.k], (self.base.tokenizer if self.text_mode else None)
        if tok is not None:
            text, token_ids, stopped = finish_text(tok, kept, run.cont, run.params.stop)
            if stopped:
                run.finish = "stop"
        else:
            text, token_ids = "", kept + run.cont
        res = WSDResult(
            text=text, token_ids=token_ids, switch_index=run.k, switched=run.switched,
            finish_reason=run.finish, draft_tokens=len(run.drafted),
            draft_text=decode(tok, kept) if tok is not None else "",
            base_tokens=len(run.cont),
            prompt_tokens={"pilot": len(run.p_ids), "base": len(run.b_ids)},
            timings=run.timer.t, rollbacks=run.rollbacks)
        self.last_result = res
        return res


@dataclass
class _Cursor:
    """Where a model's decoding stands: the logits [V] of the last fed token, or (greedy
    blocks) the next token, already chosen from them and not yet fed, [1] on the device.
    Always the request's own tensors (never a graph's static buffer), so it survives
    another request running in between."""
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
    # a decode step's logits may be a graph's static buffer: keep a copy of our own
    return torch.cat(toks), _Cursor(logits=logits.clone() if logits is not None else None)
