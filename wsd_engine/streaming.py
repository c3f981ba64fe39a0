"""The answer's text while it is being written: stop-string detection and streaming.

The final answer (`tokenization.finish_text`) is the text of kept draft + continuation,
cut before the EARLIEST occurrence of any stop string that starts at or after the end of
the kept draft's text, trailing whitespace before the cut removed. `AnswerText` follows
the tokens as they arrive and answers two questions exactly:

* `done`: can the base stop writing? Yes once some stop string has been found and no
  stop string can still start before it (e.g. stops "ab" and "xabc" on text "..xab": "ab"
  is complete, but "xabc" may still complete and would cut one character earlier).
* `pieces()`: which text is final? Everything before the first place where the cut can
  still fall — a stop found so far, or any suffix of the text that is still the start
  of a stop string — less trailing whitespace (the cut removes it). So streamed text is
  never taken back, and the pieces always join to exactly the final text.
"""
from __future__ import annotations

from .errors import WSDError
from .tokenization import IncrementalDetokenizer, decode


class AnswerText:
    """Text of the answer as tokens arrive. `stops` () disables stop strings; `tok` None
    is a token-level engine (no text at all)."""

    def __init__(self, tok, stops=()):
        self.tok = tok
        self.stops = tuple(stops) if tok is not None else ()
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.detok = IncrementalDetokenizer(tok) if tok is not None else None
        self.emitted = ""          # text handed out so far
        self.search_from = None    # where stops may start: the kept draft's text length
        self.found = -1            # earliest complete stop occurrence (absolute), or -1
        self._scanned = 0          # text length already searched for complete stops

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    # ---- drafting: the scored draft, before the switch point is known ----------------
    def draft_so_far(self, ids: list[int]):
        """The draft's tokens that will certainly be kept (same tokenizer: every scored
        token, the rule keeps at least those). Yields final text pieces."""
        if self.detok is None:
            return
        self.detok.push(ids[len(self.detok.ids):])
        yield from self.pieces()

    # ---- the switch: the kept draft is known ------------------------------------------
    def start_continuation(self, kept: list[int]):
        """Fix the kept draft (a prefix of nothing streamed past it); stops are searched
        from the end of its text on, as `finish_text` does. Yields final pieces."""
        if self.detok is None:
            return
        if self.detok.ids != kept[:len(self.detok.ids)]:
            raise WSDError("internal error: the kept draft does not extend the streamed draft")
        self.detok.push(kept[len(self.detok.ids):])
        self.search_from = len(decode(self.tok, kept)) if kept else 0
        self._scanned = self.search_from
        yield from self.pieces()

    # ---- the continuation -------------------------------------------------------------
    def push(self, token: int) -> None:
        """One continuation token (not an EOS)."""
        if self.detok is None:
            return
        self.detok.push([token])
        if not self.stops:
            return
        text = self.detok.text
        # a stop that is complete now but was not before ends in the new text
        lo = max(self.search_from, self._scanned - self.max_stop + 1)
        self._scanned = len(text)
        for s in self.stops:
            i = text.find(s, lo)
            if i != -1 and (self.found == -1 or i < self.found):
                self.found = i

    def _open_start(self) -> int:
        """Earliest position >= search_from where a stop string may still start: a suffix
        of the text that is a proper prefix of some stop (len(text) if none)."""
        text = self.detok.text
        n = len(text)
        lo = max(self.search_from if self.search_from is not None else n,
                 n - self.max_stop + 1)
        for q in range(lo, n):
            tail = text[q:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return q
        return n

    @property
    def done(self) -> bool:
        """A stop was found and no earlier-starting stop can still complete."""
        return self.found != -1 and self._open_start() >= self.found

    def cut_bound(self) -> int:
        """Text before this position is final, apart from trailing whitespace."""
        text = self.detok.text
        if self.search_from is None:      # drafting: stops start after the kept draft
            return len(text)
        end = self._open_start() if self.stops else len(text)
        return min(end, self.found) if self.found != -1 else end

    def pieces(self):
        """Yields the text that has become final since the last call (maybe nothing)."""
        if self.detok is None:
            return
        text = self.detok.text
        end = self.cut_bound()
        while end > len(self.emitted) and text[end - 1].isspace():
            end -= 1
        if end > len(self.emitted):
            piece = text[len(self.emitted):end]
            self.emitted += piece
            yield piece

    def finish(self, final_text: str):
        """The rest of the final answer text (`finish_text`'s)."""
        if self.detok is None:
            return
        if not final_text.startswith(self.emitted):
            raise WSDError(f"internal error: streamed text {self.emitted[-40:]!r} is not a prefix of the "
                                 f"final text {final_text[-40:]!r}")
        if len(final_text) > len(self.emitted):
            piece = final_text[len(self.emitted):]
            self.emitted = final_text
            yield piece
