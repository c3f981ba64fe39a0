"""Cross-tokenizer handoff: identical-tokenizer detection, identity mode, and the text-mode
invariant (emitted tokens, rollbacks applied, == one-shot encode of the final draft text)."""
import random

import pytest
from _tok_helpers import make_bpe_tokenizer

from wsd_engine.errors import RequestError
from wsd_engine.handoff import DraftHandoff, tokenizers_identical


@pytest.fixture(scope="module")
def toks():
    pilot = make_bpe_tokenizer(300)
    base = make_bpe_tokenizer(420)
    whole = make_bpe_tokenizer(600, split_words=False)   # merges may span spaces
    return pilot, base, whole


PIECES = ["hello", " world", "Hello", ",", ".", "!", "?", "\n", "\n\n", " ", "  ", "\t", " the",
          " quick", " brown", "fox", "1", " 42", "2025", "-", "...", "'s", " don't", "(", ")",
          "def", " return", " caf\u00e9", "\u00e9", " r\u00e9sum\u00e9", "Stra\u00dfe", "\u00fc",
          " \u6f22\u5b57", "\u3068\u304b", "\U0001f600", "\U0001f44d", " \U0001f600", "\"", "[User]"]


def random_text(rng):
    t = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
    if rng.random() < 0.3:
        t = rng.choice([" ", "   ", "\n", " \n ", "\t"]) + t
    if rng.random() < 0.2:
        t = t + rng.choice([" ", "\n", "  \n"])
    return t


def expected(pilot, base, ids):
    return base.encode(pilot.decode(ids, skip_special_tokens=True).strip(), add_special_tokens=False)


def run_handoff(h, ids, rng, max_chunk=16):
    """Feed ids in random chunks, applying the push contract; returns (E, rollbacks, n_early)
    where n_early = tokens emitted before the final push."""
    E, rollbacks, i = [], 0, 0
    while i < len(ids):
        m = rng.randint(1, max_chunk)
        rb, new = h.push(ids[i:i + m])
        i += m
        assert 0 <= rb <= len(E)
        rollbacks += rb < len(E)
        E = E[:rb] + new
        assert E == h.emitted
    n_early = len(E)
    rb, new = h.push([], final=True)
    rollbacks += rb < len(E)
    E = E[:rb] + new
    assert E == h.emitted and rollbacks == h.n_rollbacks
    return E, rollbacks, n_early


def test_identical_detection(toks, tmp_path):
    pilot, base, whole = toks
    pilot.save_pretrained(tmp_path / "llama-3.2-pilot")
    pilot.save_pretrained(tmp_path / "llama-3.1-base")
    from transformers import AutoTokenizer
    a = AutoTokenizer.from_pretrained(str(tmp_path / "llama-3.2-pilot"))
    b = AutoTokenizer.from_pretrained(str(tmp_path / "llama-3.1-base"))
    assert a.name_or_path != b.name_or_path
    assert tokenizers_identical(a, b) and tokenizers_identical(pilot, b)
    b.chat_template = "{{ messages[0]['content'] }}"            # templates do not matter
    assert tokenizers_identical(a, b)
    assert not tokenizers_identical(pilot, base)
    assert not tokenizers_identical(pilot, whole)
    assert not tokenizers_identical(base, whole)
    # same vocab and merges, one extra added token: different
    c = AutoTokenizer.from_pretrained(str(tmp_path / "llama-3.1-base"))
    c.add_tokens(["<extra>"])
    assert not tokenizers_identical(a, c)
    # same everything but a normalizer: different
    from tokenizers import normalizers
    d = AutoTokenizer.from_pretrained(str(tmp_path / "llama-3.1-base"))
    d.backend_tokenizer.normalizer = normalizers.NFKC()
    assert not tokenizers_identical(a, d)


def test_identity_mode_passes_ids_unchanged(toks, tmp_path):
    pilot = toks[0]
    pilot.save_pretrained(tmp_path / "other-name")
    from transformers import AutoTokenizer
    same = AutoTokenizer.from_pretrained(str(tmp_path / "other-name"))
    h = DraftHandoff(pilot, same)
    assert h.mode == "identity" and h.identity
    rng = random.Random(0)
    ids = [rng.randrange(len(pilot)) for _ in range(100)]        # specials and garbage bytes too
    E, rollbacks, n_early = run_handoff(h, ids, rng)
    assert E == ids and rollbacks == 0 and n_early == len(ids)
    assert DraftHandoff(pilot, toks[1]).mode == "text"


def test_text_mode_invariant_realistic_texts(toks):
    pilot, base, _ = toks
    rng = random.Random(1)
    total_rb = total_early = total = 0
    for _ in range(400):
        text = random_text(rng)
        ids = pilot.encode(text, add_special_tokens=False)
        h = DraftHandoff(pilot, base)
        E, rb, early = run_handoff(h, ids, rng)
        assert E == expected(pilot, base, ids) == h.target()
        assert h.draft_text() == text
        total_rb, total_early, total = total_rb + rb, total_early + early, total + len(E)
    assert total_rb == 0                      # word-splitting BPE: the stable prefix is final
    assert total_early > 0.3 * total          # and it is not empty: most tokens go out early


def test_text_mode_invariant_random_ids(toks):
    """Random pilot ids, as a tiny random model writes: invalid UTF-8, specials, spacing."""
    pilot, base, _ = toks
    rng = random.Random(2)
    for _ in range(300):
        ids = [rng.randrange(len(pilot)) for _ in range(rng.randint(0, 60))]
        h = DraftHandoff(pilot, base)
        E, rb, _ = run_handoff(h, ids, rng)
        assert E == expected(pilot, base, ids)
        assert rb == 0


def test_nothing_emitted_while_utf8_incomplete_or_only_space(toks):
    pilot, base, _ = toks
    # leading whitespace only: nothing is stable until a non-space arrives
    h = DraftHandoff(pilot, base)
    assert h.push(pilot.encode("   \n ", add_special_tokens=False)) == (0, [])
    # a multi-byte character fed byte token by byte token
    ids = pilot.encode("alpha beta gamma delta \U0001f600\U0001f44d\u6f22", add_special_tokens=False)
    seen_fffd = False
    E = []
    for i in ids:
        rb, new = h.push([i])
        if h.draft_text().endswith("\ufffd"):
            seen_fffd = True
            assert new == [] and rb == len(E)
        E = E[:rb] + new
    assert seen_fffd and len(E) > 0
    rb, new = h.push([], final=True)
    assert E[:rb] + new == expected(pilot, base, pilot.encode("   \n ", add_special_tokens=False) + ids)


def test_rollback_path_when_emitting_unstable_tokens(toks):
    """stable_words=0, margin_tokens=0 emits the whole current encode at every push: words
    that grow then need rollbacks, and the result must still be exact."""
    pilot, base, _ = toks
    # find a word whose base encode changes when it grows ("hel" -> "hello" style)
    enc = lambda t, tok=base: tok.encode(t, add_special_tokens=False)  # noqa: E731
    cases = [(w[:j], w[j:]) for w in ("hello", "quick", "brown", "model", "answer", "details",
                                      "decoding", "confident", "beginning")
             for j in range(1, len(w))]
    head, tail = next((h_, t_) for h_, t_ in cases
                      if enc(h_ + t_)[:len(enc(h_))] != enc(h_))
    h = DraftHandoff(pilot, base, mode="text", stable_words=0, margin_tokens=0)
    assert h.push(enc(head, pilot)) == (0, enc(head))             # the unstable word goes out
    rb, new = h.push(enc(tail, pilot), final=True)
    assert rb < len(enc(head)) and h.n_rollbacks == 1             # ... and is rolled back
    assert enc(head)[:rb] + new == h.emitted == enc(head + tail)
    # the default rule holds the last word back, so it never needed the rollback
    h = DraftHandoff(pilot, base)
    assert h.push(enc(head, pilot)) == (0, [])
    assert h.push(enc(tail, pilot), final=True) == (0, enc(head + tail)) and h.n_rollbacks == 0

    rng = random.Random(3)
    total_rb = 0
    for _ in range(200):
        ids = pilot.encode(random_text(rng), add_special_tokens=False)
        h = DraftHandoff(pilot, base, stable_words=0, margin_tokens=0)
        E, rb, _ = run_handoff(h, ids, rng, max_chunk=4)
        assert E == expected(pilot, base, ids)
        total_rb += rb
    assert total_rb > 20


def test_rare_rollbacks_with_merges_across_spaces(toks):
    """A base BPE without word splitting (merges like 'n a ') can change a token left of the
    last word; the default rule then rolls back, rarely, and the result stays exact."""
    pilot, _, whole = toks
    words = ("the quick brown fox jumps over lazy dog a small aligned model writes beginning "
             "of answer then strong base checks it token by").split()
    rng = random.Random(4)
    total_rb = pushes = 0
    for _ in range(400):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        ids = pilot.encode(text, add_special_tokens=False)
        h = DraftHandoff(pilot, whole)
        E, rb, _ = run_handoff(h, ids, rng, max_chunk=2)
        assert E == whole.encode(text, add_special_tokens=False)
        total_rb += rb
        pushes += len(ids)
    assert 0 < total_rb < 0.01 * pushes      # measured: 7 rollbacks in ~19,000 pushes


def test_push_errors(toks):
    pilot, base, _ = toks
    h = DraftHandoff(pilot, base)
    h.push([5, 6], final=True)
    with pytest.raises(RequestError):
        h.push([7])
    with pytest.raises(RequestError):
        DraftHandoff(pilot, base, mode="bytes")


# ---- final tokens: what no later text can change ----------------------------------------
def _metaspace_tokenizer(split: bool):
    """A SentencePiece-style BPE (spaces as "▁"), splitting on them or not."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from _tok_helpers import CORPUS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=split)
    tok.decoder = decoders.Metaspace(replacement="\u2581")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>",
                                                                  "<|eot_id|>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<|eot_id|>"])


_FINAL_KINDS = {}


def _final_kind(kind):
    if kind not in _FINAL_KINDS:
        _FINAL_KINDS[kind] = {
            "bytelevel": lambda: make_bpe_tokenizer(300),
            "bytelevel_nosplit": lambda: make_bpe_tokenizer(300, split_words=False),
            "metaspace_split": lambda: _metaspace_tokenizer(True),
            "metaspace_nosplit": lambda: _metaspace_tokenizer(False),
        }[kind]()
    return _FINAL_KINDS[kind]


_PIECES = ["the", " quick", " fox", "  ", "\n", "\n\n", "'s", "'", "12", "345", "caf",
           "\u00e9", "e\u0301", "\u6f22", "!", "?", " ", "<|eo", "t_id|>", "<|eot_id|>", "ab",
           "AB", "--", "..."]


@pytest.mark.parametrize("kind", ["bytelevel", "bytelevel_nosplit", "metaspace_split",
                                  "metaspace_nosplit"])
def test_final_tokens_never_change(kind):
    """For random texts S and continuations X: the tokens `final_count` calls final are
    the first tokens of encode(S + X), whatever X is (hypothesis over both, built from
    pieces that stress the tail: contractions, digit groups, combining marks, runs of
    spaces and newlines, a special token written out in parts)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from wsd_engine.handoff import _FinalTokens

    tok = _final_kind(kind)
    final = _FinalTokens(tok)
    text = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=10).map("".join)

    @settings(max_examples=300, deadline=None)
    @given(s=text, x=text)
    def check(s, x):
        s = s.strip()
        n = final.count(s)
        whole = tok.encode((s + x).strip(), add_special_tokens=False)
        assert tok.encode(s, add_special_tokens=False)[:n] == whole[:n], (s, x, n)

    check()
    if kind.endswith("nosplit"):
        assert final.count("the quick fox jumps over") == 0     # merges may span words
    else:
        assert final.count("the quick fox jumps over") > 0


def test_final_count_of_a_handoff(toks):
    """The handoff's final count: all after the final push; never more than emitted."""
    pilot, base, _ = toks
    ids = pilot.encode("The quick brown fox jumps over the lazy dog. " * 3,
                       add_special_tokens=False)
    h = DraftHandoff(pilot, base, mode="text")
    counts = []
    for i in range(0, len(ids), 5):
        h.push(ids[i:i + 5], final=i + 5 >= len(ids))
        counts.append(h.final_count())
        assert counts[-1] <= len(h.emitted)
    assert counts[-1] == len(h.emitted) == len(expected(pilot, base, ids))
    assert 0 < counts[len(counts) // 2] < counts[-1]         # settles as the text grows
