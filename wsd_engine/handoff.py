"""Cross-tokenizer handoff of the draft.

Same tokenizer: pilot draft ids pass to the base unchanged. Different tokenizers: the
draft's base tokens are, by definition,

    base_tok.encode(pilot_tok.decode(draft_ids, skip_special_tokens=True).strip(),
                    add_special_tokens=False)

Online, the draft arrives in chunks and the end of its text is still moving (a word
may grow, a UTF-8 character may be half-written), so `DraftHandoff` emits only a prefix
it believes stable, and reports a rollback if a later re-encode ever contradicts a token
already emitted. After the final push, the emitted tokens (rollbacks applied) equal the
one-shot encode above exactly.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

from wsd_engine.errors import RequestError
from wsd_engine.tokenization import encode

_MODEL_KEYS_SKIPPED = ("vocab", "merges")


def _definition(tok) -> dict:
    """The parts of a fast tokenizer that decide how text maps to ids and back."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise RequestError(f"{type(tok).__name__} has no backend_tokenizer; the handoff needs a "
                           "fast (tokenizers-backed) tokenizer, load it with use_fast=True")
    j = json.loads(backend.to_str())
    model = dict(j.get("model") or {})
    merges = model.get("merges")
    if merges is not None:  # "a b" strings (tokenizers < 0.20) or [a, b] pairs
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    added = sorted(
        (a.get("id"), a.get("content"), bool(a.get("special")), bool(a.get("single_word")),
         bool(a.get("lstrip")), bool(a.get("rstrip")), bool(a.get("normalized")))
        for a in (j.get("added_tokens") or []))
    return {
        "model_type": model.get("type"),
        "model_opts": {k: v for k, v in model.items() if k not in _MODEL_KEYS_SKIPPED},
        "vocab": model.get("vocab"),
        "merges": merges,
        "normalizer": j.get("normalizer"),
        "pre_tokenizer": j.get("pre_tokenizer"),
        "decoder": j.get("decoder"),
        "added_tokens": added,
    }


def _same_opts(a: dict, b: dict) -> bool:
    """Model options equal, a key missing on one side counting as None/False (library
    versions add options such as `ignore_merges` with a neutral default)."""
    for k in a.keys() | b.keys():
        va, vb = a.get(k), b.get(k)
        if va != vb and not (k not in a and vb in (None, False)) and not (k not in b and va in (None, False)):
            return False
    return True


def tokenizers_identical(tok_a, tok_b) -> bool:
    """True when two fast tokenizers map text <-> ids identically: same model (vocab,
    merges, options), normalizer, pre-tokenizer, decoder and added tokens. Names, paths,
    chat templates and post-processors (BOS/EOS insertion) are not compared."""
    if tok_a is tok_b:
        return True
    a, b = _definition(tok_a), _definition(tok_b)
    return (a["model_type"] == b["model_type"] and _same_opts(a["model_opts"], b["model_opts"])
            and all(a[k] == b[k] for k in ("vocab", "merges", "normalizer", "pre_tokenizer",
                                               "decoder", "added_tokens")))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _stable_cut(s: str, words: int, max_tail_chars: int) -> int:
    """Character position in `s` (stripped text) before which the text is taken as settled:
    before the whitespace preceding the last `words` whitespace-delimited words, but never
    more than `max_tail_chars` characters from the end (scripts without spaces)."""
    i = len(s)
    for _ in range(words):
        while i > 0 and not s[i - 1].isspace():
            i -= 1
        while i > 0 and s[i - 1].isspace():
            i -= 1
    return max(i, len(s) - max_tail_chars)


class DraftHandoff:
    """Maps the pilot's draft ids to base ids online.

    push(new_pilot_ids, final) -> (rollback_to, new_base_ids). Contract: the caller keeps
    the list of base ids emitted so far, E; after each push it sets
        E = E[:rollback_to] + new_base_ids
    i.e. it truncates the base cache (and the switch state) to |P_base| + rollback_to and
    scores new_base_ids from there. rollback_to == len(E) when nothing is rolled back
    (always so in identity mode). After a push with final=True, E equals the one-shot
    encode of the whole draft text (text mode) or all pilot ids (identity mode).

    Text mode, not final: nothing is emitted while the stripped text is empty or the text
    ends in U+FFFD (a UTF-8 character cut in half). Otherwise, with S the stripped text
    and c = `_stable_cut(S)`, the stable count is
        common_prefix(encode(S[:c]), encode(S)) - margin_tokens
    (tokens the text after c cannot change, less a safety margin). An emitted token that
    differs from the current encode of S triggers a rollback to its index at once.
    stable_words=0 and margin_tokens=0 emit everything at once (a stress test for the
    rollback path); the defaults make rollbacks rare.

    Emitted is not final: `final_count()` says how many emitted tokens no text that may
    follow can change (all of them after the final push). The engine accepts a switch
    point k only once k tokens are final, so the kept draft is exactly the one-shot
    encode's prefix.
    """

    def __init__(self, pilot_tok, base_tok, *, mode: Optional[str] = None, stable_words: int = 1,
                 margin_tokens: int = 1, max_tail_chars: int = 32):
        if mode is None:
            mode = "identity" if tokenizers_identical(pilot_tok, base_tok) else "text"
        if mode not in ("identity", "text"):
            raise RequestError(f"DraftHandoff mode must be 'identity' or 'text', got {mode!r}")
        if stable_words < 0 or margin_tokens < 0 or max_tail_chars < 0:
            raise RequestError("stable_words, margin_tokens and max_tail_chars must be >= 0")
        self.pilot_tok, self.base_tok, self.mode = pilot_tok, base_tok, mode
        self.stable_words, self.margin_tokens = stable_words, margin_tokens
        self.max_tail_chars = max_tail_chars if stable_words > 0 else 0
        self.pilot_ids: list[int] = []   # every pilot id pushed so far
        self.emitted: list[int] = []     # base ids emitted so far, rollbacks applied
        self.n_rollbacks = 0
        self.finished = False
        self._final = _FinalTokens(base_tok) if mode == "text" else None

    @property
    def identity(self) -> bool:
        return self.mode == "identity"

    def draft_text(self) -> str:
        return self.pilot_tok.decode(self.pilot_ids, skip_special_tokens=True)

    def target(self) -> list[int]:
        """The one-shot base encode of the draft so far (the definition of the draft in base tokens)."""
        s = self.draft_text().strip()
        return encode(self.base_tok, s) if s else []

    def final_count(self) -> int:
        """How many emitted tokens are final: equal to the one-shot encode's, whatever
        text the draft goes on with."""
        if self.identity or self.finished:
            return len(self.emitted)
        return min(len(self.emitted), self._final.count(self.draft_text().strip()))

    def push(self, new_pilot_ids: Iterable[int], final: bool = False) -> tuple[int, list[int]]:
        """Add pilot ids (the final call may add none); see the class docstring."""
        if self.finished:
            raise RequestError("DraftHandoff.push called after the final push; make a new handoff")
        new = [int(i) for i in new_pilot_ids]
        self.pilot_ids.extend(new)
        self.finished = bool(final)
        n_old = len(self.emitted)
        if self.identity:
            self.emitted.extend(new)
            return n_old, new

        text = self.draft_text()
        s = text.strip()
        if not final and (not s or text.endswith("\ufffd")):
            return n_old, []   # nothing settled yet; the tail is not even valid text
        target = encode(self.base_tok, s) if s else []
        if final:
            n_stable = len(target)
        else:
            cut = _stable_cut(s, self.stable_words, self.max_tail_chars)
            if cut >= len(s):
                n_stable = len(target)
            else:
                head = encode(self.base_tok, s[:cut]) if cut > 0 else []
                n_stable = max(0, _common_prefix(head, target) - self.margin_tokens)

        agree = _common_prefix(self.emitted, target)
        if agree < n_old:  # an emitted token is contradicted (or the target got shorter)
            self.n_rollbacks += 1
            start = agree
        else:
            start = n_old
        out = target[start:max(start, n_stable)]
        self.emitted[start:] = out
        return start, out


def _splits_words(pre_tokenizer: dict | None) -> bool:
    """Whether a pre-tokenizer (tokenizer.json form) cuts the text into pieces that BPE
    merges never cross: a regex split (GPT-2 / Llama 3 / Qwen2 byte-level), whitespace,
    punctuation, digits or a Metaspace that splits."""
    if not isinstance(pre_tokenizer, dict):
        return False
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return any(_splits_words(p) for p in pre_tokenizer.get("pretokenizers") or [])
    if kind == "ByteLevel":
        return bool(pre_tokenizer.get("use_regex", True))
    if kind == "Metaspace":
        return bool(pre_tokenizer.get("split", True))
    return kind in ("Split", "Whitespace", "WhitespaceSplit", "BertPreTokenizer",
                    "Punctuation", "Digits", "CharDelimiterSplit", "UnicodeScripts")


class _FinalTokens:
    """Counts the tokens of a text's encode that no appended text can change.

    A pre-tokenizer that splits the text matches its pieces left to right, each from
    characters already present; appending can change only the last piece (whose match
    may grow). Merges never cross pieces, so every token of the earlier pieces is final.
    The tail that may still become an added token (e.g. "<|eo" of "<|eot_id|>") is not
    final either, nor is anything when the normalizer rewrites the text (composition can
    reach back) or the pre-tokenizer does not split (merges may span the whole text):
    then only the end of the draft settles its tokens."""

    def __init__(self, tok):
        self.tok = tok
        backend = getattr(tok, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        self.pre = backend.pre_tokenizer if _splits_words(spec.get("pre_tokenizer")) else None
        self.normalizer = backend.normalizer if backend is not None else None
        self.added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values()
                      if getattr(t, "content", "")]

    def count(self, s: str) -> int:
        if self.pre is None or not s:
            return 0
        if self.normalizer is not None and self.normalizer.normalize_str(s) != s:
            return 0
        pieces = self.pre.pre_tokenize_str(s)
        if len(pieces) < 2:
            return 0
        end = pieces[-1][1][0]               # where the last piece starts
        for a in self.added:                 # a tail that may still grow into one
            for q in range(max(0, len(s) - len(a) + 1), len(s)):
                if q < end and a.startswith(s[q:]):
                    end = q
                    break
        if end <= 0:
            return 0
        return _common_prefix(encode(self.tok, s[:end]), encode(self.tok, s))
