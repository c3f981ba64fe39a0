"""WSD: the online loop over a pilot and a base model, for many requests at once.

Per request:
    prefill pilot(P_pilot(x)); prefill base(P_base(x))
    loop: pilot drafts a chunk of c tokens -> map to base ids -> the base scores the chunk
          with ONE forward that writes its KV cache -> the rule (log p, rolling window)
          -> on a switch at k: base cache := |P_base| + k, first continuation token from
          the hidden state of t_k, the pilot stops; if the pilot ended (EOS / cap): k = n
    base decodes the rest until EOS / stop string / max_new_tokens

The base never re-reads the prefix and the pilot never drafts past the chunk that fires.
Requests run together, each in its own phase: `step()` admits waiting requests into free
cache slots (`Scheduler`), runs one pilot chunk / base block for every running row and
one scoring forward (`BatchRunner`), then moves each request along on the host
(`Request`): schedule, run, post-process. `generate` and `stream` drive the same steps, so
a request's output does not depend on what shares its batch (up to floating-point
rounding: a forward over B rows sums in another order than one over 1).

An engine may be shared by threads: a step holds the engine's lock and both models
(`Model.reserved`: another engine or a `Model.generate` on the same models parks and
restores this engine's cached rows). Whoever steps advances every request, so a
suspended stream never blocks the others.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

from . import parallel, tuning
from .batch import BatchRunner
from .errors import ConfigError, ContextOverflowError, RequestError, TokenizerError, WSDError
from .graphs import GRAPH_BATCH_SIZES, check_sizes
from .handoff import DraftHandoff, tokenizers_identical
from .params import WSDParams
from .request import Phase, Request, RequestOutput, WSDResult
from .loading import load_model, same_device
from .runner import Model
from .sampling import Sampler
from .scheduler import Scheduler
from .sharing import CacheOwner
from .streaming import AnswerText
from .switch import SwitchState
from .tokenization import (apply_chat_template, check_ids_in_vocab, has_tokenizer,
                           is_prompt_list, max_token_chars, normalize_messages,
                           render_base_prompt)

__all__ = ["WSD", "WSDParams", "WSDResult", "RequestOutput"]


class WSD:
    """A pilot (small aligned chat model) and a base (strong base model) on one device."""

    def __init__(self, pilot: Model, base: Model, base_template=None, cuda_graphs: bool = False,
                 graph_batch_sizes=GRAPH_BATCH_SIZES, fused_gemv: bool | None = None,
                 pdl: bool | None = None, tune_kernels: bool | None = None):
        """cuda_graphs: capture, once per engine, both models' batched decode step (one
        token per row: the pilot's drafting and the base's continuation) as CUDA graphs,
        one per batch size of `graph_batch_sizes` up to the engine's `max_batch_size`, and
        `max_batch_size` itself when it lies between two sizes (`graphs.row_graph_sizes`;
        CUDA + triton backend). A step of B rows replays the smallest size >= B (padded
        with copies of its last row); larger batches, the prompt prefills and the chunk
        scoring run eagerly.
        fused_gemv / pdl (triton backend; None keeps each model's setting): the one-token
        kernels of both models (`Model.set_decode_kernels`), set before any capture.
        tune_kernels: time the one-token kernel choices on this GPU and keep the fastest
        per model (`tuning.tune_decode_kernels`, before capture; predicted a few seconds
        per model, not yet measured on a GPU).
        None (default): with cuda_graphs, for each model whose kernels nobody chose (no
        fused_gemv / pdl given here, no `set_decode_kernels` on it, no graphs captured on
        it yet); False: never.
        Models without tokenizers make a token-level engine: `generate_ids` only (no
        templates, stop strings or text). The engine runs as many requests together as
        both models have cache slots (`load_model(..., max_batch_size=N)`)."""
        for name, m in (("pilot", pilot), ("base", base)):
            if not isinstance(m, Model):
                raise ConfigError(f"{name} must be a Model (from load_model), got "
                                  f"{type(m).__name__}")
        if pilot is base:
            raise ConfigError("the same Model object was given as pilot and as base; each "
                              "needs its own KV cache: load the checkpoint twice")
        if not same_device(pilot.device, base.device):
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
        self.max_batch_size = min(pilot.max_batch_size, base.max_batch_size)
        self._scheduler = Scheduler(self.max_batch_size)
        self._runner = BatchRunner(pilot, base, self.max_batch_size)
        self._lock = threading.RLock()       # one step at a time; re-entrant for drivers
        self._owner = CacheOwner()           # this engine's rows in the models' caches
        self._in_step = False                # aborts from inside a step wait for its end
        self._aborts: list[Request] = []
        self._owned: list[Model] = []        # models from_pretrained loaded: close() closes
        self._setup_kernels(cuda_graphs, graph_batch_sizes, fused_gemv, pdl, tune_kernels)

    def _setup_kernels(self, cuda_graphs, graph_batch_sizes, fused_gemv, pdl,
                       tune_kernels) -> None:
        pilot, base = self.pilot, self.base
        if tune_kernels not in (None, True, False):
            raise ConfigError(f"tune_kernels must be True, False or None, got {tune_kernels!r}")
        check_sizes(graph_batch_sizes, "graph_batch_sizes")
        if tune_kernels and (fused_gemv is not None or pdl is not None):
            raise ConfigError("tune_kernels=True chooses fused_gemv and pdl itself; give "
                              "either those settings or tune_kernels=True, not both")
        for m in (pilot, base):
            m.set_decode_kernels(fused_gemv=fused_gemv, pdl=pdl)
        self.kernel_tuning = {}
        for name, m in (("pilot", pilot), ("base", base)):
            if tune_kernels or (tune_kernels is None and cuda_graphs and m.can_capture
                                and not m.decode_kernels_chosen and not m.has_graphs
                                and m.tensor_parallel == 1):
                self.kernel_tuning[name] = tuning.tune_decode_kernels(m)
        if cuda_graphs:
            for m in (pilot, base):
                m.capture_decode_rows(graph_batch_sizes, max_rows=self.max_batch_size)

    @classmethod
    def from_pretrained(cls, pilot, base, device="cpu", dtype=None, max_seq_len=None,
                        backend="torch", base_template=None, cuda_graphs=False,
                        graph_batch_sizes=GRAPH_BATCH_SIZES, fused_gemv=None, pdl=None,
                        tune_kernels=None, max_batch_size: int = 1, tensor_parallel: int = 1,
                        pilot_tensor_parallel: int = 1) -> "WSD":
        """Load both checkpoints; `max_batch_size` requests run together (each takes a
        KV cache slot in both models, allocated now: memory grows with it).
        tensor_parallel: split the base over N ranks (`load_model`); this process is rank
        0, the pilot stays whole on its device (pilot_tensor_parallel=M splits it too).
        The engine owns the models it loads here: `close()` (or a `with` block) stops the
        ranks' worker processes."""
        if device == "cuda" and max(tensor_parallel, pilot_tensor_parallel) != 1:
            device = "cuda:0"                   # rank 0's device: the pilot's too
        kw = dict(device=device, dtype=dtype, max_seq_len=max_seq_len, backend=backend,
                  max_batch_size=max_batch_size)
        rank = parallel.torchrun_rank()
        if rank is not None and tensor_parallel > 1:
            cls._join_torchrun_job(rank, base, tensor_parallel, pilot_tensor_parallel, kw)
        loaded = []
        try:
            loaded.append(load_model(pilot, tensor_parallel=pilot_tensor_parallel, **kw))
            loaded.append(load_model(base, tensor_parallel=tensor_parallel, **kw))
            engine = cls(*loaded, base_template, cuda_graphs=cuda_graphs,
                         graph_batch_sizes=graph_batch_sizes, fused_gemv=fused_gemv, pdl=pdl,
                         tune_kernels=tune_kernels)
        except BaseException:
            for m in loaded:
                m.close()
            raise
        engine._owned = loaded
        return engine

    @staticmethod
    def _join_torchrun_job(rank: int, base, tensor_parallel: int, pilot_tensor_parallel: int,
                           kw: dict) -> None:
        """Under torchrun every rank runs the script: only rank 0 holds the pilot and the
        engine. Every other rank joins the split base at once (its `load_model` serves rank 0
        and leaves the script when rank 0 closes it), so it never loads a pilot of its own
        (on CUDA that copy would land on rank 0's device). The pilot cannot be split too:
        a torchrun rank serves one model."""
        if pilot_tensor_parallel != 1:
            if rank != 0:
                raise SystemExit(1)              # rank 0 reports it
            raise ConfigError("under torchrun only the base is split: give "
                              f"pilot_tensor_parallel=1 (got {pilot_tensor_parallel}); the "
                              "pilot stays whole on rank 0")
        if rank != 0:
            load_model(base, tensor_parallel=tensor_parallel, **kw)
            raise SystemExit(0)          # not reached: the ranks above 0 leave in there

    def close(self) -> None:
        """Close the models this engine loaded itself (`from_pretrained`): a
        tensor-parallel model's worker processes stop. Models given to the constructor are
        the caller's to close. Idempotent."""
        for m in self._owned:
            m.close()

    def __enter__(self) -> "WSD":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- public API: whole requests ------------------------------------------------
    def generate(self, prompt, params=None):
        """One prompt (str or messages) -> WSDResult; a list of prompts -> list, in order,
        run together as a batch (params: one WSDParams for all, or a list, one per prompt).
        Every prompt is checked before any runs."""
        if is_prompt_list(prompt):
            plist = self._params_list(params, len(prompt))
            return self._run_all([self._new_request(None, p, q, None, internal=True)
                                  for p, q in zip(prompt, plist)])
        if isinstance(params, (list, tuple)):
            raise RequestError("a list of params needs a list of prompts")
        return self._run_all([self._new_request(None, prompt, params, None, internal=True)])[0]

    def generate_ids(self, pilot_prompt_ids, base_prompt_ids, params=None):
        """Token-level WSD for callers that render prompts themselves (serving stacks,
        benchmarks): the pilot's prompt ids (its chat template applied) and the base's.
        Lists of id lists run as a batch (params: one or one per prompt). Text fields are
        empty and stop strings unused when the models have no tokenizer."""
        if _is_id_batch(pilot_prompt_ids) or _is_id_batch(base_prompt_ids):
            if not (_is_id_batch(pilot_prompt_ids) and _is_id_batch(base_prompt_ids)
                    and len(pilot_prompt_ids) == len(base_prompt_ids)):
                raise RequestError("give both prompts as id lists, or both as lists of id "
                                   "lists of the same length")
            plist = self._params_list(params, len(pilot_prompt_ids))
            return self._run_all([self._new_request(None, None, q, (p, b), internal=True)
                                  for p, b, q in zip(pilot_prompt_ids, base_prompt_ids, plist)])
        req = self._new_request(None, None, params, (pilot_prompt_ids, base_prompt_ids),
                                internal=True)
        return self._run_all([req])[0]

    def stream(self, prompt, params: Optional[WSDParams] = None) -> Iterator[str]:
        """Yields text pieces as soon as they are final; returns the WSDResult (the
        generator's return value; also `last_result`). Runs with the engine's other
        requests; nothing runs before the first `next()`. Closing the generator early
        aborts the request."""
        req = self._new_request(None, prompt, params, None, internal=True)
        self._add(req)
        try:
            while True:
                out = self._next_output(req)
                if out.text:
                    yield out.text
                if out.finished:
                    return self._result_of(req)
        finally:
            if req.phase is not Phase.FINISHED:
                self._abort_own(req)

    # ---- public API: the request-level engine -------------------------------------------
    def add_request(self, request_id, prompt, params: Optional[WSDParams] = None) -> None:
        """Queue a request: `prompt` is a str, a list of messages, or a pair
        (pilot prompt ids, base prompt ids). It runs from the next `step()` on (at once if
        a cache slot is free, else when one frees up). Raises RequestError (bad prompt,
        params or a duplicate unfinished id) before anything is queued."""
        ids = tuple(prompt) if _is_id_pair(prompt) else None
        self._add(self._new_request(request_id, None if ids else prompt, params, ids,
                                    internal=False))

    def abort(self, request_id) -> bool:
        """Stop a request (waiting or running): its slots are freed at once and its next
        output says finished, finish_reason "abort". False if no such unfinished request."""
        with self._lock:
            req = self._scheduler.get(request_id)
            if req is None or req.internal or req.phase is Phase.FINISHED:
                return False
            self._end_now_or_after_step(req)
            return True

    def step(self) -> list[RequestOutput]:
        """Run one step for every running request (admitting waiting ones into free
        slots first) and return what is new for the requests of `add_request`: text and
        token ids since the last output, and on the finish the reason and the result."""
        with self._lock:
            if self._has_work():
                self._step()
            outs = []
            for req in self._scheduler.requests():
                if not req.internal:
                    out = req.take_output()
                    if out is not None:
                        outs.append(out)
                    if req.reported:
                        self._scheduler.forget(req)
            return outs

    def has_unfinished_requests(self) -> bool:
        """Requests of `add_request` not finished, or whose last output `step()` has not
        returned yet."""
        with self._lock:
            return any(not r.internal for r in self._scheduler.requests())

    @property
    def num_running(self) -> int:
        return self._scheduler.n_running

    @property
    def num_waiting(self) -> int:
        return self._scheduler.n_waiting

    # ---- requests --------------------------------------------------------------------
    def _params_list(self, params, n: int) -> list:
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * n
        if len(plist) != n:
            raise RequestError(f"{n} prompts but {len(plist)} params; give one WSDParams for "
                               "all or one per prompt")
        return plist

    def _new_request(self, request_id, prompt, params, ids, internal: bool) -> Request:
        """Validate and tokenize (on the caller's thread, outside the engine lock)."""
        params = WSDParams() if params is None else params
        if not isinstance(params, WSDParams):
            raise RequestError(f"params must be a WSDParams, got {type(params).__name__}")
        params = params.checked()
        try:
            hash(request_id)
        except TypeError:
            raise RequestError(f"request_id must be hashable (a str or an int), got "
                               f"{type(request_id).__name__}") from None
        p_ids, b_ids = self._prompt_ids(prompt, params, ids)
        tok_p = self.pilot.tokenizer if self.text_mode else None
        tok_b = self.base.tokenizer if self.text_mode else None
        dev = self.base.device
        return Request(
            request_id=request_id if not internal else object(), params=params,
            p_ids=p_ids, b_ids=b_ids, text=AnswerText(tok_b, params.stop),
            handoff=DraftHandoff(tok_p, tok_b, mode="identity" if self.identity else "text"),
            switch=SwitchState.from_threshold(params.window, params.threshold),
            p_sampler=Sampler(params.pilot_params, dev), b_sampler=Sampler(params.base_params, dev),
            pilot_eos=frozenset(self.pilot_eos), base_eos=frozenset(self.base_eos),
            base_tok=tok_b, internal=internal)

    def _add(self, req: Request) -> None:
        with self._lock:
            self._scheduler.add(req)

    def _run_all(self, reqs: list[Request]) -> list[WSDResult]:
        """Queue internal requests and step until all are done; results in order."""
        with self._lock:
            for r in reqs:
                self._scheduler.add(r)
        try:
            for r in reqs:
                self._next_output(r, wait_finish=True)
            return [self._result_of(r) for r in reqs]
        finally:
            for r in reqs:
                if r.phase is not Phase.FINISHED:
                    self._abort_own(r)

    def _next_output(self, req: Request, wait_finish: bool = False):
        """Step (holding the lock for one step at a time, so other threads' requests go
        on in between) until `req` has output (`wait_finish`: until it finished)."""
        while True:
            with self._lock:
                if req.phase is Phase.FINISHED or not wait_finish:
                    out = req.take_output()
                    if out is not None and (out.finished or not wait_finish):
                        if out.finished:
                            self._scheduler.forget(req)
                        return out
                if not self._has_work():
                    raise WSDError("internal error: a request is unfinished but nothing is "
                                   "queued or running")
                self._step()

    def _result_of(self, req: Request) -> WSDResult:
        if req.error is not None:
            raise req.error
        if req.result is None:
            raise RequestError("the request was aborted")
        self.last_result = req.result
        return req.result

    def _abort_own(self, req: Request) -> None:
        """End one of this engine's requests (a stream closed early, a driver interrupted)."""
        with self._lock:
            if req.phase is not Phase.FINISHED:
                self._end_now_or_after_step(req)
            self._scheduler.forget(req)

    def _end_now_or_after_step(self, req: Request) -> None:
        """Abort; from inside a step (a stream finalized by the garbage collector while
        this thread steps), or while this thread is inside another use of a model, only
        once that is over (at the end of the next step), so no call loses a row."""
        if self._in_step or self.pilot.in_use_here() or self.base.in_use_here():
            # inside a step, or inside another use of a model by this thread (a stream
            # collected during a Model.generate): the next step ends it
            self._aborts.append(req)
        else:
            self._end(req, "abort")

    # ---- one step: schedule, run, post-process -------------------------------------------
    def _has_work(self) -> bool:
        return self._scheduler.n_running > 0 or self._scheduler.n_waiting > 0

    def _step(self) -> None:
        self._in_step = True
        try:
            with self._hold():
                admitted = self._scheduler.admit()
                if admitted:
                    self._timed(admitted, "prefill", self._runner.prefill, admitted)
                drafting, continuing = self._scheduler.drafting(), self._scheduler.continuing()
                if drafting or continuing:
                    self._run_rows(drafting, continuing)
        except BaseException as e:
            self._fail_running(e)
            if not isinstance(e, Exception):
                raise
            raise WSDError(f"a batched step failed; its requests ended with an error: "
                           f"{type(e).__name__}: {e}") from e
        finally:
            self._in_step = False
            while self._aborts:
                req = self._aborts.pop()
                if req.phase is not Phase.FINISHED:
                    self._end(req, "abort")

    def _fail_running(self, e: BaseException) -> None:
        """A failed forward (or a failed put-back of this engine's parked rows) leaves the
        rows' model state unknown: end them all, and start the caches afresh for the next
        requests (a new owner has nothing to restore)."""
        for req in self._scheduler.drafting() + self._scheduler.continuing():
            self._end(req, "error", e if isinstance(e, Exception) else WSDError(
                f"the step was interrupted ({type(e).__name__})"))
        self._owner.release()
        self._owner = CacheOwner()

    def _run_rows(self, drafting: list[Request], continuing: list[Request]) -> None:
        t0 = time.perf_counter()
        chunks, blocks = self._runner.decode_blocks(drafting, continuing)
        t1 = time.perf_counter()
        for r in drafting:
            r.add_time("drafting", t1 - t0)
        for r in continuing:
            r.add_time("continuation", t1 - t0)
        for req, block in zip(continuing, blocks):
            self._guarded(req, self._book, req, block)
        # the rows that go on feed their block's last token in the scoring forward
        feeds = [(r, b[-1]) for r, b in zip(continuing, blocks) if r.phase is Phase.CONTINUING]
        jobs = []
        for req, chunk in zip(drafting, chunks):
            job = self._guarded(req, self._job_for, req, chunk)
            if job is not None:
                jobs.append((req, job))
        if jobs or feeds:
            self._score(jobs, feeds)
        self._switch([r for r in drafting if r.phase is Phase.DRAFTING])

    def _job_for(self, req: Request, chunk: list[int]):
        job = req.after_chunk(chunk)
        if job is not None:          # a base tokenizer may emit ids past the embedding
            check_ids_in_vocab(job.ids, self.base.config.vocab_size, "base")
        return job

    def _score(self, jobs, feeds) -> None:
        t0 = time.perf_counter()
        results = self._runner.score_and_feed(jobs, feeds)
        dt = time.perf_counter() - t0
        for req, _ in feeds:
            req.add_time("continuation", dt)
        for (req, job), (logp, first) in zip(jobs, results):
            req.add_time("scoring", dt)
            self._guarded(req, req.after_score, job, logp, first)

    def _switch(self, drafting: list[Request]) -> None:
        """Rows whose draft is over start their continuation; the others stream what of
        their draft is certain."""
        over = []
        for req in drafting:
            if self._guarded(req, req.draft_over):
                over.append(req)
            elif req.phase is Phase.DRAFTING:
                self._guarded(req, req.stream_draft)
        if not over:
            return
        self._runner.switch(over)
        for req in over:
            if self._guarded(req, req.start_continuation) == 0:
                self._finish(req)

    def _book(self, req: Request, block: list[int]) -> None:
        if req.book(block):
            self._finish(req)

    def _guarded(self, req: Request, fn, *args):
        """A host step of one request; an error there ends that request only."""
        if req.phase is Phase.FINISHED:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to the request's caller
            self._end(req, "error", e)
            return None

    def _finish(self, req: Request) -> None:
        self._release(req)
        req.timings["total"] = time.perf_counter() - req.t_added
        self._guarded(req, req.make_result)

    def _end(self, req: Request, reason: str, error: Optional[BaseException] = None) -> None:
        self._release(req)
        req.fail(reason, error)

    def _release(self, req: Request) -> None:
        if req.slot is not None:
            self._runner.release(req)
        self._scheduler.release(req)

    def _timed(self, reqs, name, fn, *args):
        """Host wall time of a phase, added to each request in it."""
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        for r in reqs:
            r.timings.setdefault("queued", t0 - r.t_added)
            r.add_time(name, dt)
        return out

    @contextmanager
    def _hold(self):
        """Both models reserved for this engine (always in the same order: no deadlock);
        if reserving the second fails, the first is let go."""
        with ExitStack() as stack:
            for m in sorted((self.pilot, self.base), key=id):
                stack.enter_context(m.reserved(self._owner))
            yield

    # ---- prompts ---------------------------------------------------------------------
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


def _is_id_batch(x) -> bool:
    """A list of id lists (or 2-D tensor rows given as lists)."""
    return (isinstance(x, (list, tuple)) and len(x) > 0
            and all(isinstance(r, (list, tuple)) or hasattr(r, "dim") for r in x))


def _is_id_pair(x) -> bool:
    """(pilot prompt ids, base prompt ids) for `add_request`: a pair (tuple) of anything
    but messages (the ids are checked after)."""
    return isinstance(x, tuple) and len(x) == 2 and not any(isinstance(r, dict) for r in x)
