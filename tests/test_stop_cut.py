"""The stop-string cut of the answer text (`finish_text`), pinned with expectations written
out by hand.

Engine and reference share `finish_text`, so the engine-vs-reference tests cannot see a
bug in it: here every expected text is a literal. The rule (tokenization.finish_text):
the answer is draft + continuation, cut before the earliest stop string that starts in the
continuation's text (the search starts after the draft text), trailing whitespace before
the cut removed; token_ids ends at the shortest continuation prefix whose text reaches the
cut (the kept draft is never cut).
"""
import pytest

from wsd_engine.synthetic import make_tokenizer
from wsd_engine.tokenization import decode, finish_text

STOPS = ("[User]", "[System]", "[Assistant]")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


def enc(tok, s):
    return tok.encode(s, add_special_tokens=False)


def cut(tok, draft, cont, stops=STOPS):
    """finish_text on the encodes of two texts, with the invariants every cut must keep."""
    d, c = enc(tok, draft), enc(tok, cont)
    assert decode(tok, d) == draft and decode(tok, d + c) == draft + cont   # round trip
    text, ids, stopped = finish_text(tok, d, c, stops)
    full = d + c
    j = len(ids)
    assert ids == full[:j] and len(d) <= j                   # a prefix, the draft kept whole
    if not stopped:
        assert ids == full
    else:
        assert decode(tok, ids).startswith(text)             # reaches the cut ...
        if j > len(d):                                       # ... and one token less does not
            assert len(decode(tok, ids[:-1])) < len(text)
    return text, stopped, ids, d, c


def test_trailing_whitespace_before_the_stop_removed(tok):
    text, stopped, ids, d, c = cut(tok, "Hello there. ", "Sure thing.  \n\n[User]\nmore")
    assert (text, stopped) == ("Hello there. Sure thing.", True)
    # the continuation's tokens up to and including "." (its text is exactly the cut)
    n = len(enc(tok, "Sure thing."))
    assert c[:n] == enc(tok, "Sure thing.")
    assert ids == d + c[:n]
    assert decode(tok, ids) == "Hello there. Sure thing."


def test_tabs_and_newlines_removed_too(tok):
    text, stopped, _, _, _ = cut(tok, "Answer:", " yes\t \n \n[System] bye")
    assert (text, stopped) == ("Answer: yes", True)


def test_stop_at_the_very_start_of_the_continuation(tok):
    text, stopped, ids, d, _ = cut(tok, "Hello there.", "[User]\nhi")
    assert (text, stopped, ids) == ("Hello there.", True, d)
    # the draft's own trailing whitespace goes too (the text), the draft ids stay whole
    text, stopped, ids, d, _ = cut(tok, "Hello there. ", " \n[User]\nhi")
    assert (text, stopped, ids) == ("Hello there.", True, d)


def test_stop_inside_the_draft_text_not_counted(tok):
    text, stopped, _, _, _ = cut(tok, "Quote: [User] ok. ", "Done.\n[User]\nnext")
    assert (text, stopped) == ("Quote: [User] ok. Done.", True)
    # only in the draft: no stop at all, nothing cut
    text, stopped, ids, d, c = cut(tok, "Quote: [User] ok. ", "Done and done.  ")
    assert (text, stopped, ids) == ("Quote: [User] ok. Done and done.  ", False, d + c)
    # one that starts inside the draft text and ends in the continuation: the search
    # starts after the draft text, so it is not a stop either
    text, stopped, _, _, _ = cut(tok, "Begin [Us", "er] tail")
    assert (text, stopped) == ("Begin [User] tail", False)


def test_earliest_of_several_stops_wins(tok):
    stops = ("[User]", "###", "never")
    text, stopped, _, _, _ = cut(tok, "Q.", " A b. ### c [User] d", stops)
    assert (text, stopped) == ("Q. A b.", True)
    # the order of the stops does not matter, only where they occur
    text, stopped, _, _, _ = cut(tok, "Q.", " A b. [User] c ### d", ("###", "never", "[User]"))
    assert (text, stopped) == ("Q. A b.", True)
    # a stop that is a prefix of another: the earliest position, whichever string
    text, stopped, _, _, _ = cut(tok, "Q.", " one [Assistant] two", ("[Assistant]", "[Ass"))
    assert (text, stopped) == ("Q. one", True)


def test_stop_split_across_tokens(tok):
    d = enc(tok, "Hi.")
    c = enc(tok, " ok [Us") + enc(tok, "er] rest")          # "[User]" spans the two pieces
    pieces = [decode(tok, [i]) for i in c]
    assert "[User]" not in pieces and "".join(pieces) == " ok [User] rest"
    text, ids, stopped = finish_text(tok, d, c, STOPS)
    assert (text, stopped) == ("Hi. ok", True)
    assert ids == d + enc(tok, " ok")                       # " ok" ends exactly at the cut
    assert decode(tok, ids) == "Hi. ok"


def test_token_spanning_the_cut_kept_whole(tok):
    # a stop beginning inside a token: the token that reaches the cut is kept, its text
    # past the cut is not part of the answer text
    d = enc(tok, "X:")
    c = enc(tok, " thing")
    pieces = [decode(tok, [i]) for i in c]
    assert pieces[-1].endswith("ing") and len(pieces[-1]) > 2
    text, ids, stopped = finish_text(tok, d, c, ("ng",))
    assert (text, stopped) == ("X: thi", True)
    assert ids == d + c                                      # the "...ing" token is needed
    assert decode(tok, ids) == "X: thing"


def test_no_stop_text_unchanged(tok):
    text, stopped, ids, d, c = cut(tok, "Hello there. ", "Sure thing.  \n\nmore  \n")
    assert (text, stopped, ids) == ("Hello there. Sure thing.  \n\nmore  \n", False, d + c)
    # no stop strings given: "[User]" is ordinary text
    text, stopped, ids, d, c = cut(tok, "Hi.", " [User] x ", ())
    assert (text, stopped, ids) == ("Hi. [User] x ", False, d + c)
    # no continuation: the draft as it is
    d = enc(tok, "Only the draft [User] ")
    assert finish_text(tok, d, [], STOPS) == ("Only the draft [User] ", d, False)
