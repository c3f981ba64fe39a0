"""A WSD request's settings: `WSDParams`, validated when made and again when a request
starts (fields may be changed in between)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import RequestError
from .sampling import SamplingParams
from .switch import check_threshold, check_window
from .tokenization import DEFAULT_STOP, check_text


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
