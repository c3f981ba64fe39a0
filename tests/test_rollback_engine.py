"""The engine through real cross-tokenizer rollbacks, against the offline reference.

With two tokenizers the engine scores the stable prefix of the re-encoded draft that
`DraftHandoff` emits; when a later re-encode changes a token already emitted (and scored),
the handoff reports a rollback and the engine must truncate its scored tokens, switch state
and base cache there. Random tiny models almost never reach that path (every other engine
test has r.rollbacks == 0), so here the draft and the base tokenizer are built for it:

* the pilot is a successor table (attention and MLP outputs zeroed, one orthogonal
  embedding per source token), so its greedy draft is a fixed sequence of whole-word
  tokens "w1", " w2", " w3", ... whatever the positions, in transformers and here alike;
* the base tokenizer is a byte-level BPE without word splitting whose merges are the
  adjacent character pairs of the draft's tail, the rightmost pair ranked first. BPE then
  pairs the tail up from its right end: "abcd" -> "ab" "cd" but "abcde" -> "a" "bc" "de",
  so every character added flips the pairing of the whole tail, across spaces. A token the
  handoff took as stable (left of the last word, past its one-token margin) changes when
  the next push adds an odd number of characters. Every adjacent pair of the tail occurs
  once, so the merges are unambiguous.

The engine's output must equal ReferenceWSD's (the whole draft re-encoded once and scored
once) token for token, for chunk sizes 1, 3 and 8, with rollbacks > 0 in every run.
"""
import random

import pytest
import torch

from wsd_engine.engine import WSD, WSDParams
from wsd_engine.handoff import DraftHandoff
from wsd_engine.reference import ReferenceWSD
from wsd_engine.synthetic import CHAT_TEMPLATE, make_model

PROMPT = "Tell me about the quick brown fox."
N_PREFIX, N_TAIL = 4, 20          # words before the merge chain, words in it
CHUNKS = (1, 3, 8)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _candidate_words(seed):
    """N_PREFIX + N_TAIL distinct lowercase words; in the text "w1 w2 ..." every adjacent
    character pair of the tail (from its first word on) occurs once, or None."""
    rng = random.Random(seed)
    words, pairs = [], set()
    for n in range(N_PREFIX + N_TAIL):
        for _ in range(200):
            w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7)))
            if w in words:
                continue
            if n < N_PREFIX:
                break
            # the word with the space before it (in the tail) and after it (not the last)
            text = (" " if n > N_PREFIX else "") + w + (" " if n < N_PREFIX + N_TAIL - 1 else "")
            new = {(text[i], text[i + 1]) for i in range(len(text) - 1)}
            if len(new) == len(text) - 1 and not new & pairs:
                pairs |= new
                break
        else:
            return None
        words.append(w)
    return words


def engine_pushes(ids, chunk):
    """The handoff pushes the engine makes for a draft `ids` ended by the pilot's EOS:
    chunks of `chunk` pilot tokens, the one holding the EOS final (EOS dropped)."""
    out = []
    for i in range(0, len(ids) + 1, chunk):
        out.append((ids[i:i + chunk], i + chunk > len(ids)))
    return out


def handoff_rollbacks(pilot_tok, base_tok, ids, chunk):
    """(rollbacks, emitted) of the default DraftHandoff fed as the engine feeds it."""
    h = DraftHandoff(pilot_tok, base_tok)
    for new, final in engine_pushes(ids, chunk):
        h.push(new, final=final)
    return h.n_rollbacks, h.emitted


def pilot_ids(tok, words):
    return [tok.convert_tokens_to_ids(("" if i == 0 else "\u0120") + w)
            for i, w in enumerate(words)]


def find_words():
    """The first candidate (seeds 0, 1, ...) whose draft the default handoff rolls back
    for every chunk size in CHUNKS (depends on the parities of the word lengths at the
    push boundaries); deterministic."""
    for seed in range(1000):
        words = _candidate_words(seed)
        if words is None:
            continue
        pt, bt = make_pilot_tokenizer(words), make_base_tokenizer(words)
        ids = pilot_ids(pt, words)
        if all(handoff_rollbacks(pt, bt, ids, c)[0] > 0 for c in CHUNKS):
            return words
    raise AssertionError("no word list found")


def _byte_level():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.ByteLevel.alphabet()


def _fast(vocab, merges, split_words, chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _base_vocab():
    """<pad> 0, <s> 1, </s> 2 (the ids tiny_config uses), then the 256 byte symbols."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(_byte_level()):
        vocab[ch] = len(vocab)
    return vocab


def make_pilot_tokenizer(words):
    """Bytes (so any prompt encodes) + one token per draft word: "w1", " w2", " w3", ..."""
    vocab = _base_vocab()
    for i, w in enumerate(words):
        vocab[("" if i == 0 else "\u0120") + w] = len(vocab)      # U+0120: byte-level space
    return _fast(vocab, [], split_words=True, chat_template=CHAT_TEMPLATE)


def make_base_tokenizer(words, n_prefix=N_PREFIX):
    """No word splitting; merges = the adjacent pairs of the tail "wP wP+1 ... wN" of the
    draft text (P = n_prefix + 1), the rightmost pair first (lowest rank)."""
    tail = " ".join(words[n_prefix:]).replace(" ", "\u0120")
    pairs = [(tail[i], tail[i + 1]) for i in range(len(tail) - 1)]
    assert len(set(pairs)) == len(pairs)
    merges = list(reversed(pairs))
    vocab = _base_vocab()
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return _fast(vocab, merges, split_words=False)


def successor_table(model, transitions, scale=10.0):
    """Turn a tiny Llama into a table `next token = transitions[current token]`: attention
    and MLP outputs zeroed, each source token one orthogonal embedding (norm sqrt(d), left
    as it is by RMSNorm with weight 1), every other embedding 0. A source gives its
    successor a logit of scale * sqrt(d) = 80 and every other token 0; any other token
    gives all-zero logits (log p = -log V for every token)."""
    d = model.config.hidden_size
    assert len(transitions) <= d
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (src, dst) in enumerate(transitions.items()):
            model.model.embed_tokens.weight[src, i] = d ** 0.5
            model.lm_head.weight[dst, i] = scale


def _random_base(model):
    """A random sharpened base (as make_wsd_pair's): log p's of a few units, no EOS."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
        model.lm_head.weight.mul_(4.0)
        model.lm_head.weight[model.config.eos_token_id].zero_()


EOS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """words, tokenizers, the pilot's draft ids, the draft's one-shot base encode, and
    make_base(name, transitions=None) -> checkpoint folder (None: a random base)."""
    words = find_words()
    pilot_tok, base_tok = make_pilot_tokenizer(words), make_base_tokenizer(words)
    ids = pilot_ids(pilot_tok, words)
    nl = pilot_tok.encode("\n", add_special_tokens=False)
    assert len(nl) == 1                      # every chat prompt ends with this token
    chain = nl + ids + [EOS]
    root = tmp_path_factory.mktemp("rollback")
    pilot = make_model(str(root / "pilot"), "llama", seed=1, tokenizer=pilot_tok,
                       transform=lambda m: successor_table(m, dict(zip(chain, chain[1:]))))
    final = base_tok.encode(" ".join(words), add_special_tokens=False)

    def make_base(name, transitions=None):
        return make_model(str(root / name), "llama", seed=2, tokenizer=base_tok,
                          init_scale=5.0, transform=(_random_base if transitions is None else
                                                     lambda m: successor_table(m, transitions)))
    return dict(words=words, pilot_tok=pilot_tok, base_tok=base_tok, ids=ids, final=final,
                pilot=pilot, make_base=make_base)


def test_the_construction_really_rolls_back(setup):
    """The draft is the planned one, and the default handoff, fed as the engine feeds it,
    rolls back on it for every chunk size (the precondition of the engine tests)."""
    base = setup["make_base"]("random")
    ref = ReferenceWSD(setup["pilot"], base)
    r = ref.generate(PROMPT, draft_max_tokens=64, max_new_tokens=80, threshold=1.0)
    assert r.draft_ids == setup["ids"]
    assert ref.pilot_tok.decode(r.draft_ids) == " ".join(setup["words"])
    assert r.draft_base_ids == setup["final"]
    for c in CHUNKS:
        n, emitted = handoff_rollbacks(ref.pilot_tok, ref.base_tok, r.draft_ids, c)
        assert n > 0, c
        assert emitted == setup["final"]


def test_handoff_rollback_by_hand():
    """The mechanism on a short draft, every push written out: "xy" then the tail
    "ab cde fg h ij" whose pairs are the merges. The tail is paired from its right end, so
    "ab cde fg h" encodes as a|b_|cd|e_|fg|_h and "ab cde fg h ij" as ab|_c|de|_f|g_|h_|ij
    (_ = space): the last push adds 3 characters and changes tokens two words back."""
    words = ["xy", "ab", "cde", "fg", "h", "ij"]
    pt, bt = make_pilot_tokenizer(words), make_base_tokenizer(words, n_prefix=1)
    h = DraftHandoff(pt, bt)
    got = []
    for i, t in enumerate(pilot_ids(pt, words)):
        start, new = h.push([t], final=i == len(words) - 1)
        got.append((h.draft_text(), start, [bt.decode([j]) for j in new]))
    assert got == [
        # the head (text before the last word) and the full text encode alike on the
        # first m tokens: m - 1 (the margin) are stable
        ("xy", 0, []),                                # one word: no head
        ("xy ab", 0, ["x"]),                          # x|y vs x|y|_|ab: m = 2
        ("xy ab cde", 1, ["y", " "]),                 # x|y|_|ab vs x|y|_|ab|_c|de: m = 4
        ("xy ab cde fg", 3, []),                      # x|y|_|ab|_c|de vs x|y|_|a|b_|cd|e_|fg
        ("xy ab cde fg h", 3, ["a", "b ", "cd", "e "]),   # m = 8: a|b_|cd|e_ now emitted
        # final: "ab cde fg h ij" re-pairs the whole tail; rollback to token 3
        ("xy ab cde fg h ij", 3, ["ab", " c", "de", " f", "g ", "h ", "ij"]),
    ]
    assert h.n_rollbacks == 1
    assert h.emitted == bt.encode("xy ab cde fg h ij", add_special_tokens=False)


def _engine_vs_reference(pilot, base, chunks=CHUNKS, **kw):
    """Engine == reference for every chunk size, with rollbacks in every run; returns the
    reference result."""
    ref = ReferenceWSD(pilot, base).generate(PROMPT, **kw)
    wsd = WSD.from_pretrained(pilot, base)
    for c in chunks:
        r = wsd.generate(PROMPT, WSDParams(chunk=c, **kw))
        assert r.rollbacks > 0, c                 # rolled back before the switch / the end
        assert (r.token_ids, r.switch_index, r.switched) == \
            (ref.token_ids, ref.switch_index, ref.switched), c
        assert r.text == ref.text, c
        assert r.finish_reason == ref.finish_reason, c
    return ref


def test_engine_with_rollbacks_equals_reference_no_switch(setup):
    """A random base, no window passes: the whole re-encoded draft is kept, then the base
    continues; the rolled-back tokens must leave no trace."""
    ref = _engine_vs_reference(setup["pilot"], setup["make_base"]("random"),
                               draft_max_tokens=64, max_new_tokens=80, threshold=1.0)
    assert not ref.switched and ref.switch_index == len(setup["final"])
    assert ref.token_ids[:ref.switch_index] == setup["final"]
    assert len(ref.token_ids) == 80


def test_engine_with_rollbacks_equals_reference_late_switch(setup):
    """A base that is sure of the draft's last tokens only (as re-encoded from the whole
    draft): the window (w = 6) ending at the second-to-last draft token is the first to
    pass, after every rollback; the base then writes "!" and its EOS."""
    final = setup["final"]
    n = len(final)
    tail = final[n - 8:n - 1]                     # 6 transitions into final[n-7 .. n-2]
    bang = setup["base_tok"].encode("!", add_special_tokens=False)
    assert len(set(tail)) == len(tail) and bang[0] not in tail
    transitions = dict(zip(tail, tail[1:]))
    transitions[tail[-1]] = bang[0]
    transitions[bang[0]] = EOS
    ref = _engine_vs_reference(setup["pilot"], setup["make_base"]("late", transitions),
                               draft_max_tokens=64, max_new_tokens=80, threshold=0.5)
    assert ref.switched and ref.switch_index == n - 1
    assert ref.token_ids == final[:n - 1] + bang and ref.finish_reason == "eos"
    assert ref.text == setup["base_tok"].decode(final[:n - 1]) + "!"


def test_switch_on_tokens_a_later_rollback_retracts(setup):
    """The base is sure of exactly the tokens the first chunk-1 rollback retracts: a
    window passes on them while they are scored, but by the definition (ReferenceWSD: the
    draft re-encoded in one go) those tokens never exist and no window passes. The engine
    holds a switch until its tokens are final (this tokenizer's merges cross words, so
    only the end of the draft settles them) and drops it when the rollback comes: the
    same answer as the reference. (Before that rule the engine switched at k = 16.)"""
    pt, bt, ids, final = setup["pilot_tok"], setup["base_tok"], setup["ids"], setup["final"]
    h, emitted = DraftHandoff(pt, bt), []
    for new, last in engine_pushes(ids, 1):
        start, out = h.push(new, final=last)
        if start < len(emitted):
            stale = emitted[start - 1:]           # the agreed token before, then retracted
            break
        emitted = emitted[:start] + out
    assert len(stale) >= 4 and len(set(stale)) == len(stale)
    assert stale[1] != final[start]
    base = setup["make_base"]("stale", dict(zip(stale, stale[1:])))
    kw = dict(draft_max_tokens=64, max_new_tokens=80, threshold=0.5, window=3)
    ref = ReferenceWSD(setup["pilot"], base).generate(PROMPT, **kw)
    assert not ref.switched and ref.switch_index == len(final)
    r = WSD.from_pretrained(setup["pilot"], base).generate(PROMPT, WSDParams(chunk=1, **kw))
    assert (r.token_ids, r.switch_index, r.switched) == \
        (ref.token_ids, ref.switch_index, ref.switched)
