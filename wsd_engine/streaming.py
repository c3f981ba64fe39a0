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


class _StopAutomaton:
    """Aho-Corasick over the stop strings, fed the continuation's text one character at
    a time: amortised O(1) per character whatever the number and length of the stops
    (a scan of the tail per token cost 18x a request's time with 500 stops of 1,000
    characters). After each character it knows the longest stop ending there and the
    longest text suffix that is still a proper prefix of some stop."""

    def __init__(self, stops):
        self.goto: list[dict] = [{}]         # node -> {char: node}; node 0 = empty prefix
        self.depth = [0]                     # length of the prefix a node stands for
        self.fail = [0]
        self.word = [0]                      # longest stop that is a suffix of the node
        for st in stops:
            node = 0
            for ch in st:
                nxt = self.goto[node].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[node][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.fail.append(0)
                    self.word.append(0)
                node = nxt
            self.word[node] = len(st)
        queue = list(self.goto[0].values())
        for node in queue:                   # breadth first: a node's fail is shallower
            for ch, nxt in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f].get(ch, 0)     # shallower than nxt
                self.word[nxt] = max(self.word[nxt], self.word[self.fail[nxt]])
                queue.append(nxt)
        self.node = 0

    def feed(self, ch: str) -> int:
        """One more character; the length of the longest stop ending with it (0: none)."""
        node = self.node
        while node and ch not in self.goto[node]:
            node = self.fail[node]
        self.node = self.goto[node].get(ch, 0)
        return self.word[self.node]

    def open_tail(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop (a stop
        may still start that many characters back)."""
        node = self.node
        while node and not self.goto[node]:  # a complete stop nothing extends: shorter
            node = self.fail[node]
        return self.depth[node]


class AnswerText:
    """Text of the answer as tokens arrive. `stops` () disables stop strings; `tok` None
    is a token-level engine (no text at all)."""

    def __init__(self, tok, stops=()):
        self.tok = tok
        self.stops = tuple(stops) if tok is not None else ()
        self.detok = IncrementalDetokenizer(tok) if tok is not None else None
        self.n_emitted = 0         # characters handed out so far: detok.text[:n_emitted]
        self.search_from = None    # where stops may start: the kept draft's text length
        self.found = -1            # earliest complete stop occurrence (absolute), or -1
        self._scanned = 0          # text length fed to the automaton
        self._auto = _StopAutomaton(self.stops) if self.stops else None

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
        self._feed()
        yield from self.pieces()

    # ---- the continuation -------------------------------------------------------------
    def push(self, token: int) -> None:
        """One continuation token (not an EOS)."""
        if self.detok is None:
            return
        self.detok.push([token])
        self._feed()

    def _feed(self) -> None:
        """Run the stop automaton over the text added since the last call."""
        if self._auto is None:
            return
        text = self.detok.text
        # from the end of the kept draft's text on (the detokenizer may still be behind
        # it while a character is incomplete)
        for i in range(self._scanned, len(text)):
            n = self._auto.feed(text[i])
            if n and (self.found == -1 or i + 1 - n < self.found):
                self.found = i + 1 - n
        self._scanned = max(self._scanned, len(text))

    def _open_start(self) -> int:
        """Earliest position where a stop string may still start: before a suffix of the
        text that is a proper prefix of some stop (len(text) if none)."""
        n = len(self.detok.text)
        return n - self._auto.open_tail() if self._auto is not None else n

    @property
    def done(self) -> bool:
        """A stop was found and no earlier-starting stop can still complete."""
        return self.found != -1 and self._open_start() >= self.found

    def cut_bound(self) -> int:
        """Text before this position is final, apart from trailing whitespace."""
        text = self.detok.text
        if self.search_from is None:      # drafting: stops start after the kept draft
            return len(text)
        end = self._open_start()
        return min(end, self.found) if self.found != -1 else end

    def pieces(self):
        """Yields the text that has become final since the last call (maybe nothing)."""
        if self.detok is None:
            return
        text = self.detok.text
        end = self.cut_bound()
        while end > self.n_emitted and text[end - 1].isspace():
            end -= 1
        if end > self.n_emitted:
            piece = text[self.n_emitted:end]
            self.n_emitted = end
            yield piece

    def finish(self, final_text: str):
        """The rest of the final answer text (`finish_text`'s)."""
        if self.detok is None:
            return
        emitted = self.detok.text[:self.n_emitted]
        if not final_text.startswith(emitted):
            raise WSDError(f"internal error: streamed text {emitted[-40:]!r} is not a prefix "
                           f"of the final text {final_text[-40:]!r}")
        if len(final_text) > self.n_emitted:
            piece = final_text[self.n_emitted:]
            self.n_emitted = len(final_text)
            yield piece
