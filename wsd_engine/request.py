"""One WSD request's state, and the host-side rules that move it along.

A request goes WAITING (queued, no cache slot) -> DRAFTING (the pilot drafts chunks, the
base scores them) -> CONTINUING (the base writes the rest) -> FINISHED. The engine runs
the models for many requests at once; what happens between its forwards for one request
— the pilot's EOS, the tokenizer handoff with its rollbacks, the switch point, the
continuation's EOS / stop strings / budget, the streamed text — happens here, so the same
code decides for a request whatever else shares its batch.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from .handoff import DraftHandoff
from .sampling import Sampler
from .streaming import AnswerText
from .switch import SwitchState
from .tokenization import decode, finish_text


class Phase(enum.Enum):
    WAITING = "waiting"
    DRAFTING = "drafting"
    CONTINUING = "continuing"
    FINISHED = "finished"


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
    timings: dict = field(default_factory=dict)         # seconds: queued, total, per phase
    rollbacks: int = 0                 # cross-tokenizer re-encode rollbacks

    @property
    def tokens_per_second(self) -> float:
        total = self.timings.get("total", 0.0)
        return len(self.token_ids) / total if total > 0 else float("nan")


@dataclass
class RequestOutput:
    """What one `WSD.step()` produced for one request."""
    request_id: object
    text: str                          # new final answer text since the last output
    token_ids: list[int]               # new answer tokens (base ids) since the last output
    finished: bool
    finish_reason: Optional[str] = None   # "eos" | "stop" | "length" | "abort" | "error"
    result: Optional[WSDResult] = None    # on a normal finish: the whole result
    error: Optional[BaseException] = None  # finish_reason "error": what went wrong


@dataclass(eq=False)
class ScoreJob:
    """Draft tokens of one request the base scores in this step: base ids `ids` at draft
    positions start + 1 .. start + len(ids) (the base cache is cut to prompt + start)."""
    start: int
    ids: list[int]


@dataclass(eq=False)
class Request:
    request_id: object
    params: object                     # WSDParams, validated
    p_ids: list[int]                   # pilot prompt ids
    b_ids: list[int]                   # base prompt ids
    text: AnswerText
    handoff: DraftHandoff
    switch: SwitchState
    p_sampler: Sampler
    b_sampler: Sampler
    pilot_eos: frozenset
    base_eos: frozenset
    base_tok: object = None            # None: a token-level request (no text)
    internal: bool = False             # driven by generate / stream, not by step() callers
    phase: Phase = Phase.WAITING
    slot: Optional[int] = None         # cache slot in both models while running
    drafted: list[int] = field(default_factory=list)   # pilot ids (no EOS)
    scored: list[int] = field(default_factory=list)    # base draft ids scored so far
    pilot_done: bool = False
    k: Optional[int] = None            # the switch point, once known
    switched: bool = False
    cont: list[int] = field(default_factory=list)      # continuation ids (no EOS)
    finish: str = "length"
    error: Optional[BaseException] = None
    result: Optional[WSDResult] = None
    # output not yet handed out
    out_text: list[str] = field(default_factory=list)
    out_ids: list[int] = field(default_factory=list)
    n_ids_out: int = 0                 # answer ids handed out (kept draft + continuation)
    reported: bool = False             # the finished output was handed out
    timings: dict = field(default_factory=dict)
    t_added: float = field(default_factory=time.perf_counter)
    t_started: Optional[float] = None

    # ---- drafting --------------------------------------------------------------------
    def draft_budget(self) -> int:
        """Pilot tokens to draft in this step."""
        return min(self.params.chunk, self.params.draft_max_tokens - len(self.drafted))

    def feeds_last_draft_token(self, n: int) -> bool:
        """Whether the last of n drafted tokens is fed to the pilot (more drafting follows)."""
        return len(self.drafted) + n < self.params.draft_max_tokens

    def after_chunk(self, chunk: list[int]) -> Optional[ScoreJob]:
        """The pilot's chunk is back: cut it at EOS, hand it to the base tokenizer, undo a
        pending switch or scored tokens a re-encode changed. Returns what the base scores."""
        eos = frozenset() if self.params.ignore_eos else self.pilot_eos
        new_p = []
        for t in chunk:
            if t in eos:
                self.pilot_done = True
                break
            new_p.append(t)
        self.drafted.extend(new_p)
        self.pilot_done = self.pilot_done or len(self.drafted) == self.params.draft_max_tokens
        start, new_b = self.handoff.push(new_p, final=self.pilot_done)
        if self.k is not None:
            # two tokenizers: a switch point waits until its tokens are final; one changed
            # by the re-encode undoes it, and scoring goes on from there
            if start >= self.k:
                return None
            self.k, self.switched = None, False
        if start < len(self.scored):     # an already scored token changed: roll back
            self.switch.truncate(start)
            del self.scored[start:]
        new_b = new_b[:self.params.max_new_tokens - start]
        return ScoreJob(start, new_b) if new_b else None

    def after_score(self, job: ScoreJob, logp: list[float], first: int) -> None:
        """The base scored `job`: log p of its tokens and the device rule's first passing
        index in it (-1: none)."""
        self.switch.record(logp)
        self.scored.extend(job.ids)
        force = self.params.force_switch
        if force is None:
            if first >= 0:
                self.k, self.switched = job.start + first + 1, True
        elif job.start < force <= job.start + len(job.ids):
            self.k, self.switched = force, True
        if self.k is None and len(self.scored) >= self.params.max_new_tokens:
            self.k = len(self.scored)    # the draft alone fills max_new_tokens

    def draft_over(self) -> bool:
        """The switch point stands (its tokens are final) or the draft ended; fixes k."""
        if self.k is not None and self.handoff.final_count() >= self.k:
            return True
        if not self.pilot_done:
            return False
        if self.k is None:
            self.k = len(self.scored)    # no window passed: keep the whole draft
        return True

    def stream_draft(self) -> None:
        """Same tokenizer: every scored token will be kept (k >= len(scored)); with two
        tokenizers a rollback may still change them, so the text waits."""
        if self.k is None and self.handoff.identity:
            self._collect(self.text.draft_so_far(self.scored))
            self._ids_out(self.scored)

    # ---- the continuation --------------------------------------------------------------
    def start_continuation(self) -> int:
        """The kept draft is fixed: streams it; returns the continuation's token budget."""
        kept = self.scored[:self.k]
        self._collect(self.text.start_continuation(kept))
        self._ids_out(kept)
        self.phase = Phase.CONTINUING
        return self.params.max_new_tokens - self.k

    def budget_left(self) -> int:
        return self.params.max_new_tokens - self.k - len(self.cont)

    def book(self, tokens: list[int]) -> bool:
        """Continuation tokens in order; True once the answer is complete (EOS, a stop
        string, the budget). Tokens after the end are ignored."""
        eos = frozenset() if self.params.ignore_eos else self.base_eos
        for t in tokens:
            if t in eos:
                self.finish = "eos"
                return True
            self.cont.append(t)
            self.text.push(t)
            if self.text.done:
                self.finish = "stop"
                return True
            if self.budget_left() <= 0:
                return True
        self._collect(self.text.pieces())
        self._ids_out(self.cont, offset=self.k)      # the kept draft is out already
        return False

    # ---- the end ---------------------------------------------------------------------
    def make_result(self) -> WSDResult:
        kept, tok = self.scored[:self.k], self.base_tok
        if tok is not None:
            text, token_ids, stopped = finish_text(tok, kept, self.cont, self.params.stop)
            if stopped:
                self.finish = "stop"
        else:
            text, token_ids = "", kept + self.cont
        res = WSDResult(
            text=text, token_ids=token_ids, switch_index=self.k, switched=self.switched,
            finish_reason=self.finish, draft_tokens=len(self.drafted),
            draft_text=decode(tok, kept) if tok is not None else "",
            base_tokens=len(self.cont),
            prompt_tokens={"pilot": len(self.p_ids), "base": len(self.b_ids)},
            timings=self.timings, rollbacks=self.handoff.n_rollbacks)
        self._collect(self.text.finish(res.text))   # the rest; checks the streamed prefix
        self._ids_out(res.token_ids)
        self.result = res
        self.phase = Phase.FINISHED
        return res

    def fail(self, reason: str, error: Optional[BaseException] = None) -> None:
        self.finish, self.error, self.phase = reason, error, Phase.FINISHED

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def take_output(self) -> Optional[RequestOutput]:
        """What is new since the last call (None if nothing is)."""
        finished = self.phase is Phase.FINISHED
        if not (self.out_text or self.out_ids or (finished and not self.reported)):
            return None
        out = RequestOutput(self.request_id, "".join(self.out_text), self.out_ids,
                            finished, self.finish if finished else None,
                            self.result if finished else None, self.error)
        self.out_text, self.out_ids = [], []
        self.reported = finished
        return out

    def _collect(self, pieces) -> None:
        self.out_text.extend(pieces)

    def _ids_out(self, ids: list[int], offset: int = 0) -> None:
        """Hand out the answer ids past those already handed out; `ids` are the answer's
        ids from position `offset` on (no copy of the whole answer per step)."""
        have = self.n_ids_out - offset
        if len(ids) > have:
            self.out_ids.extend(ids[have:])
            self.n_ids_out = offset + len(ids)
