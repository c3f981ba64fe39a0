"""The WSD switch rule, in one place: batch form, incremental form, numerics.

Draft tokens t_1..t_n (base ids) have base probabilities p_i. With window w and threshold
gamma, s_i = (p_{i-w+1} ... p_i)^(1/w) for i >= w (undefined, never passing, for i < w).
The switch point is k = min{i : s_i >= gamma}, 1-based, the token completing the first
passing window being kept; if no window passes, k = n and `fired` is False.

Canonical numerics (every implementation must reproduce them bit for bit):
  * log p_i is taken as given (fp32 log-probs from the model's log_softmax, upcast
    exactly to float64); when probabilities are given instead, log is taken in float64;
  * a window sum is accumulated in float64, oldest term first:
        ((lp[i-w+1] + lp[i-w+2]) + ...) + lp[i]
  * a window passes iff  sum / w >= log(gamma)  in float64 (log(gamma) = math.log).
p = 0 gives log p = -inf, so no window containing it passes; a NaN never passes.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from wsd_engine.errors import RequestError, WSDError
from wsd_engine.rows import to_device

ArrayLike = Union[torch.Tensor, Sequence[float]]


def check_window(window) -> int:
    """`window` as an int >= 1, else RequestError."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise RequestError(f"window must be an integer >= 1 (e.g. 6), got {window!r}")
    return int(window)


def check_threshold(threshold) -> float:
    """`threshold` (gamma) as a float in (0, 1], else RequestError."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise RequestError(f"threshold must be a number in (0, 1] (e.g. 0.8), got {threshold!r}")
    t = float(threshold)
    if not (0.0 < t <= 1.0):  # also rejects NaN
        raise RequestError(f"threshold must be in (0, 1] (e.g. 0.8), got {threshold!r}")
    return t


def _as_float64_1d(x: ArrayLike, what: str) -> torch.Tensor:
    """A CPU float64 1-D copy of `x` (one host transfer for a device tensor)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().reshape(-1) if x.dim() == 0 else x.detach()
        t = t.cpu().to(torch.float64)  # fp32/bf16 -> float64 is exact
    else:
        t = torch.tensor([float(v) for v in x], dtype=torch.float64)
    if t.dim() != 1:
        raise RequestError(f"{what} must be 1-D (one value per draft token), got shape {tuple(t.shape)}")
    return t


def window_means(logp64: torch.Tensor, window: int) -> torch.Tensor:
    """Canonical window means: [L] float64 log p -> [max(L - w + 1, 0)] float64.

    Entry j is the mean of logp64[j : j + w], summed oldest first (see module docstring)."""
    n_win = logp64.shape[0] - window + 1
    if n_win <= 0:
        return logp64.new_empty(0)
    acc = logp64[0:n_win].clone()                  # (n_win,)
    for j in range(1, window):                      # sequential in j, vectorised over windows
        acc = acc + logp64[j:j + n_win]
    return acc / window


def _first_pass(means: torch.Tensor, log_gamma: float) -> Optional[int]:
    """0-based index of the first window with mean >= log_gamma, or None."""
    hits = torch.nonzero(means >= log_gamma)
    return int(hits[0, 0]) if hits.numel() else None


def switch_index_logp(logp: ArrayLike, window: int = 6, threshold: float = 0.8) -> tuple[int, bool]:
    """(k, fired) from log-probs log p_1..log p_n of the draft tokens (see module docstring)."""
    window, threshold = check_window(window), check_threshold(threshold)
    lp = _as_float64_1d(logp, "logp")
    n = lp.shape[0]
    j = _first_pass(window_means(lp, window), math.log(threshold))
    if j is None:
        return n, False
    return j + window, True


def switch_index(probs: ArrayLike, window: int = 6, threshold: float = 0.8) -> tuple[int, bool]:
    """(k, fired) from probabilities p_1..p_n of the draft tokens under the base model.

    k is 1-based: the number of draft tokens kept (the token completing the first window
    whose geometric mean is >= threshold is kept); k = n and fired = False when no window
    passes (including n < window). Probabilities are logged in float64."""
    window, threshold = check_window(window), check_threshold(threshold)
    p = _as_float64_1d(probs, "probs")
    return switch_index_logp(torch.log(p), window, threshold)


@dataclass(slots=True)
class SwitchState:
    """The rule fed chunk by chunk, as the engine scores the draft online.

    Holds every scored log p (float64; a draft is at most a few hundred tokens) so that a
    cross-tokenizer rollback can `truncate` it. `update` gives the same k as
    `switch_index_logp` on the concatenation of all chunks, for any chunking."""

    window: int
    log_gamma: float                      # math.log(threshold), <= 0
    logps: list[float] = field(default_factory=list)   # [n_scored] float64, all scored log p
    k: Optional[int] = None               # 1-based switch index once a window passed

    def __post_init__(self):
        self.window = check_window(self.window)
        lg = self.log_gamma
        if isinstance(lg, bool) or not isinstance(lg, numbers.Real) or not (-math.inf < float(lg) <= 0.0):
            raise RequestError(f"log_gamma must be log(threshold) for a threshold in (0, 1], got {lg!r}")
        self.log_gamma = float(lg)

    @classmethod
    def from_threshold(cls, window: int = 6, threshold: float = 0.8) -> "SwitchState":
        return cls(check_window(window), math.log(check_threshold(threshold)))

    @property
    def n_scored(self) -> int:
        """Number of draft tokens scored so far."""
        return len(self.logps)

    @property
    def finished(self) -> bool:
        return self.k is not None

    @property
    def carried(self) -> list[float]:
        """The last min(n_scored, window - 1) log p's, oldest first (float64)."""
        c = self.window - 1
        return self.logps[-c:] if c > 0 else []

    @property
    def n_prev(self) -> int:
        """How many entries of `carry_tensor` are real (the rest is left padding)."""
        return min(self.n_scored, self.window - 1)

    def carry_tensor(self, device=None) -> torch.Tensor:
        """[window - 1] fp32 carry for a kernel taking (carry, n_prev): oldest first,
        left-padded with 0 where fewer than window - 1 tokens were scored."""
        c = self.window - 1
        vals = self.carried
        out = torch.zeros(c, dtype=torch.float32)
        if vals:
            out[c - len(vals):] = torch.tensor(vals, dtype=torch.float64).to(torch.float32)
        return out.to(device) if device is not None else out

    def update(self, logp_chunk: ArrayLike) -> Optional[int]:
        """Score the next chunk of log p's; returns the global 1-based k of the first
        passing window ending inside this chunk (and marks the state finished), else None.

        `logp_chunk` may be a tensor on any device (one host transfer) or a sequence."""
        if self.k is not None:
            raise WSDError(f"SwitchState.update called after the switch fired at k={self.k}; "
                           "start a new SwitchState for a new draft")
        chunk = _as_float64_1d(logp_chunk, "logp_chunk")
        if chunk.numel() == 0:
            return None
        prev = self.carried
        n_before = self.n_scored
        buf = torch.cat([torch.tensor(prev, dtype=torch.float64), chunk]) if prev else chunk
        self.logps.extend(chunk.tolist())
        j = _first_pass(window_means(buf, self.window), self.log_gamma)
        if j is None:
            return None
        # window j covers buf[j : j + w]; buf[0] is global token n_before - len(prev) + 1
        self.k = n_before - len(prev) + j + self.window
        return self.k

    def record(self, logp_chunk: ArrayLike) -> None:
        """Keep a chunk's log p's without applying the rule (a switch point forced from
        outside, for benchmarks), so that `truncate` still works."""
        self.logps.extend(_as_float64_1d(logp_chunk, "logp_chunk").tolist())

    def truncate(self, n: int) -> None:
        """Forget every scored token after the first n (cross-tokenizer rollback). A switch
        that fired at k > n is forgotten too: the window it passed on no longer exists."""
        if self.k is not None and n >= self.k:
            raise WSDError(f"SwitchState.truncate to {n} tokens after the switch fired at "
                           f"k={self.k}: the switch stands, nothing before it changed")
        if not (0 <= n <= self.n_scored):
            raise WSDError(f"cannot truncate SwitchState to {n} tokens: {self.n_scored} scored")
        del self.logps[n:]
        self.k = None


def first_pass_rows(logp: torch.Tensor, counts: list[int], carry: torch.Tensor,
                    n_prev: torch.Tensor, window: torch.Tensor,
                    log_gamma: torch.Tensor) -> torch.Tensor:
    """The rule for the chunks of several requests at once, on the device.

    logp [T] fp32: row b's chunk is logp[sum(counts[:b]) : ... + counts[b]];
    carry [B, W - 1] float64: row b's last min(n_prev[b], window[b] - 1) scored log p's
    (`SwitchState.carried`), right-aligned (W the largest window); n_prev [B] int64: tokens
    row b scored before this chunk; window [B] int64; log_gamma [B] float64. Returns [B] int64: the
    0-based index in row b's chunk of the token completing its first passing window, or -1.

    The same float64 operations in the same order as `SwitchState.update` (window sums
    oldest first, then / w, then >= log_gamma), so the decision equals the host rule's bit
    for bit; no host sync."""
    B, W1 = carry.shape
    Q = max(counts)
    dev = logp.device
    n_t = to_device(counts, dev)                                               # [B]
    rows = torch.repeat_interleave(torch.arange(B, device=dev), n_t,
                                   output_size=logp.shape[0])                  # [T]
    starts = n_t.cumsum(0) - n_t                                               # [B]
    idx = torch.arange(logp.shape[0], device=dev) - starts[rows]               # [T]
    buf = torch.zeros(B, W1 + Q, dtype=torch.float64, device=dev)             # [B, W-1+Q]
    buf[:, :W1] = carry
    buf[rows, W1 + idx] = logp.double()
    i = torch.arange(Q, device=dev)                                            # [Q]
    acc = torch.zeros(B, Q, dtype=torch.float64, device=dev)
    for o in range(W1 + 1):           # term o of the window ending at chunk token i
        col = (W1 + i)[None, :] - window[:, None] + 1 + o                      # [B, Q]
        term = buf.gather(1, col.clamp(0, W1 + Q - 1))
        use = (o < window)[:, None]
        acc = torch.where(use, term if o == 0 else acc + term, acc)
    means = acc / window[:, None].double()
    valid = (i[None, :] < n_t[:, None]) & \
        ((n_prev[:, None] + i[None, :] + 1) >= window[:, None])
    hit = valid & (means >= log_gamma[:, None])
    first = torch.where(hit, i[None, :].expand(B, Q), Q).min(1).values
    return torch.where(first < Q, first, -1)
