"""Stop strings and streaming: the streamed pieces always join to exactly the final text,
for every stop set (including stops that a token runs past, stops that overlap, and one
stop that starts before another but completes after it), and the engine's answer equals
the offline reference's (which cuts the full continuation at the earliest stop)."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd_engine import WSD, WSDParams
from wsd_engine.reference import ReferenceWSD
from wsd_engine.streaming import AnswerText
from wsd_engine.synthetic import make_tokenizer, make_wsd_pair
from wsd_engine.tokenization import decode, finish_text

PROMPT = "Tell me about the quick brown fox."


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


def _run_stream(tok, kept, cont, stops):
    """Drive AnswerText as the engine does; returns (pieces, tokens consumed)."""
    a = AnswerText(tok, stops)
    pieces = list(a.draft_so_far(kept[:len(kept) // 2]))
    pieces += list(a.start_continuation(kept))
    used = []
    for t in cont:
        used.append(t)
        a.push(t)
        if a.done:
            break
        pieces += list(a.pieces())
    text, _, _ = finish_text(tok, kept, used, stops)
    pieces += list(a.finish(text))
    return pieces, used, text


_ALPHABET = "ab e[]AUsrnt\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_answer_text_streams_exactly_the_final_text(tok, data):
    """Random draft / continuation ids (multi-byte characters included) and random stop
    strings: substrings of the continuation's text (so they hit, at any offset, with a
    token running past them) and short strings over a small alphabet (overlaps)."""
    n_vocab = len(tok)
    ids = st.lists(st.integers(3, n_vocab - 1), max_size=40)
    kept, cont = data.draw(ids), data.draw(ids)
    full = decode(tok, kept + cont)
    start = len(decode(tok, kept)) if kept else 0
    stops = data.draw(st.lists(st.text(_ALPHABET, min_size=1, max_size=5), max_size=3))
    if len(full) > start:
        i = data.draw(st.integers(start, len(full) - 1))
        j = data.draw(st.integers(i + 1, min(len(full), i + 12)))
        if full[i:j]:
            stops.append(full[i:j])
    stops = tuple(s for s in stops if s)
    pieces, used, text = _run_stream(tok, kept, cont, stops)
    assert "".join(pieces) == text
    # stopping early changed nothing: the same text as cutting the whole continuation
    assert text == finish_text(tok, kept, cont, stops)[0]


@pytest.mark.parametrize("text, stops, want", [
    ("Sure: xab and more", ("ab", "xabc"), "Sure: x"),          # "ab" completes first
    ("Sure: xabc and more", ("ab", "xabc"), "Sure:"),           # "xabc" starts earlier
    ("one two  \n[User] three", ("[User]",), "one two"),        # whitespace before a stop
    ("[User] right away", ("[User]",), ""),
    ("no stop here", ("[User]", "zz"), "no stop here"),
])
def test_hand_written_cuts(tok, text, stops, want):
    """Cuts written out by hand, fed one token at a time, with an empty kept draft."""
    cont = tok.encode(text, add_special_tokens=False)
    pieces, used, got = _run_stream(tok, [], cont, stops)
    assert got == want and "".join(pieces) == want


def test_earlier_starting_longer_stop_waits_for_more_text(tok):
    """After "ab" is complete, "xabc" may still complete and start one character earlier:
    the stream must not be done, and must not emit the "x" yet."""
    a = AnswerText(tok, ("ab", "xabc"))
    list(a.start_continuation([]))
    for t in tok.encode("Hi xab", add_special_tokens=False):
        a.push(t)
    assert a.found == 4 and not a.done
    assert "".join(a.pieces()) == "Hi"          # "x" could still be cut, and the space
    for t in tok.encode("d", add_special_tokens=False):
        a.push(t)
    assert a.done


# ---- through the engine, against the reference --------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok):
    # the demo's kind of pair (readable text: letters, spaces, punctuation), on which
    # the stops "e" and " " used to crash the stream
    return make_wsd_pair(str(tmp_path_factory.mktemp("stops")), sharpen=100.0, damp=0.02,
                         perturb=0.15, seed=2, readable=True, tokenizer=tok)


@pytest.fixture(scope="module")
def engines(pair):
    return WSD.from_pretrained(*pair), ReferenceWSD(*pair)


def test_engine_stops_match_reference_and_stream(engines):
    """Stops the issue reported as crashing ("e", " ", "an", "answer", "[Assistant]"),
    plus substrings of the real continuation at random offsets: stream == generate ==
    the reference, for several chunk sizes."""
    wsd, ref = engines
    kw = dict(draft_max_tokens=24, max_new_tokens=64)
    free = ref.generate(PROMPT, stop=(), **kw)
    kept_text = decode(ref.base_tok, free.token_ids[:free.switch_index])
    cont_text = free.text[len(kept_text):]
    rng = random.Random(0)
    stop_sets = [("e",), (" ",), ("an",), ("answer",), ("[Assistant]",),
                 ("[User]", "[System]", "[Assistant]")]
    for _ in range(5):
        i = rng.randrange(0, max(1, len(cont_text) - 1))
        stop_sets.append((cont_text[i:i + rng.randint(1, 6)], "zzz"))
    hits = 0
    for stops in stop_sets:
        want = ref.generate(PROMPT, stop=stops, **kw)
        chunk = rng.choice((1, 3, 8))
        params = WSDParams(stop=stops, chunk=chunk, **kw)
        pieces = list(wsd.stream(PROMPT, params))
        r = wsd.last_result
        assert "".join(pieces) == r.text == want.text, (stops, chunk)
        assert r.token_ids == want.token_ids and r.finish_reason == want.finish_reason
        assert wsd.generate(PROMPT, params).text == want.text
        hits += want.finish_reason == "stop"
    assert hits >= 6           # the substrings really hit



@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_shortest_prefix_search_equals_the_linear_definition(tok, data):
    """finish_text's binary search for the cut's token prefix gives what the one-token-at-
    a-time scan gives (random ids, multi-byte characters split across tokens included)."""
    from wsd_engine.tokenization import _shortest_prefix
    ids = data.draw(st.lists(st.integers(3, len(tok) - 1), max_size=30))
    lo = data.draw(st.integers(0, len(ids)))
    n = data.draw(st.integers(0, len(decode(tok, ids)) + 2))
    j = lo
    while j < len(ids) and len(decode(tok, ids[:j])) < n:
        j += 1
    assert _shortest_prefix(tok, ids, lo, n) == j
