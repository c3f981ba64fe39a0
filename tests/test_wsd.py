"""The online WSD engine against the offline three-stage reference (fp32, CPU, greedy):
token-identical for early / late / never switches, pilot EOS, drafts shorter than w,
different tokenizers, every chunk size, stop strings. Each test asserts the k it expects,
so none can pass vacuously."""
import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

from wsd_engine import ConfigError, ContextOverflowError, RequestError
from wsd_engine.engine import WSD, WSDParams
from wsd_engine.reference import ReferenceWSD
from wsd_engine.sampling import SamplingParams
from wsd_engine.synthetic import make_tokenizer, make_wsd_pair, without_tokenizer

PROMPT = "Tell me about the quick brown fox."
CHUNKS = (1, 3, 8, 64)
DRAFT, NEW = 64, 96


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(320)


def _pair(tmp_path_factory, name, **kw):
    return make_wsd_pair(str(tmp_path_factory.mktemp(name)), sharpen=100.0, **kw)


@pytest.fixture(scope="module")
def early(tmp_path_factory, tok):      # identical bigram models: k = w
    return _pair(tmp_path_factory, "early", damp=0.0, perturb=0.0, tokenizer=tok)


@pytest.fixture(scope="module")
def mid(tmp_path_factory, tok):        # small perturbation: fires after a few windows
    return _pair(tmp_path_factory, "mid", damp=0.02, perturb=0.05, tokenizer=tok)


@pytest.fixture(scope="module")
def late(tmp_path_factory, tok):       # medium perturbation: the first passing window is late
    return _pair(tmp_path_factory, "late", damp=0.05, perturb=0.25, seed=1, tokenizer=tok)


@pytest.fixture(scope="module")
def never(tmp_path_factory, tok):      # large perturbation: no window passes
    return _pair(tmp_path_factory, "never", damp=0.0, perturb=0.4, tokenizer=tok)


@pytest.fixture(scope="module")
def cross(tmp_path_factory, tok):      # different tokenizers (different merges and vocab)
    return make_wsd_pair(str(tmp_path_factory.mktemp("cross")), sharpen=8.0, damp=0.02,
                         perturb=0.05, tokenizer=tok,
                 pilot_tokenizer=make_tokenizer(420))


def _check(pair, expect, chunks=CHUNKS, prompt=PROMPT, **kw):
    """Engine == reference for every chunk size; returns the reference result."""
    ref = ReferenceWSD(*pair).generate(prompt, **kw)
    expect(ref)
    wsd = WSD.from_pretrained(*pair)
    for c in chunks:
        r = wsd.generate(prompt, WSDParams(chunk=c, **kw))
        assert (r.switch_index, r.switched) == (ref.switch_index, ref.switched), c
        assert r.token_ids == ref.token_ids, c
        assert r.text == ref.text, c
        assert r.finish_reason == ref.finish_reason, c
        assert r.token_ids[:r.switch_index] == ref.draft_base_ids[:ref.switch_index]
    return ref


def _threshold_between(logp, window, k_min):
    """A threshold whose first passing window ends at some k >= k_min, chosen where that
    window's mean clears every earlier mean by a margin (robust to rounding)."""
    lp = torch.tensor(logp, dtype=torch.float64)
    means = [lp[i - window:i].mean().item() for i in range(window, len(lp) + 1)]
    for j in range(k_min - window, len(means)):
        before = max(means[:j], default=-math.inf)
        if means[j] > before + 1e-3:
            lo = max(before, means[j] - 1.0)
            return math.exp((lo + means[j]) / 2), j + window
    raise AssertionError("no window to target; change the model pair")


def test_early_switch_k_equals_window(early):
    _check(early, lambda r: (r.switched and r.switch_index == 6) or pytest.fail(r.switch_index),
           draft_max_tokens=DRAFT, max_new_tokens=NEW)


def test_switch_after_some_windows(mid):
    _check(mid, lambda r: (r.switched and 6 < r.switch_index < 30) or pytest.fail(r.switch_index),
           draft_max_tokens=DRAFT, max_new_tokens=NEW)


def test_late_switch(late):
    _check(late, lambda r: (r.switched and 40 < r.switch_index < DRAFT)
           or pytest.fail(r.switch_index), draft_max_tokens=DRAFT, max_new_tokens=NEW)


def test_never_switches_keeps_draft_to_cap(never):
    _check(never, lambda r: (not r.switched and r.switch_index == DRAFT == len(r.draft_ids))
           or pytest.fail(r.switch_index), draft_max_tokens=DRAFT, max_new_tokens=NEW)


def _pilot_with_eos(pair, tmp_path, min_pos, max_pos):
    """Copy of the pilot whose generation_config names as EOS the first draft token that
    first appears at a position in [min_pos, max_pos]; returns (pair, position)."""
    ref = ReferenceWSD(*pair).generate(PROMPT, draft_max_tokens=DRAFT, max_new_tokens=NEW)
    d = ref.draft_ids
    pos = next(j for j in range(min_pos, max_pos + 1) if d[j] not in d[:j])
    pilot = str(tmp_path / "pilot_eos")
    shutil.copytree(pair[0], pilot)
    path = os.path.join(pilot, "generation_config.json")
    gen = json.load(open(path))
    gen["eos_token_id"] = [gen.get("eos_token_id", 2), d[pos]]
    json.dump(gen, open(path, "w"))
    return (pilot, pair[1]), pos


def test_pilot_eos_before_any_switch(never, tmp_path):
    pair, pos = _pilot_with_eos(never, tmp_path, 8, 40)
    _check(pair, lambda r: (not r.switched and r.switch_index == pos == len(r.draft_ids))
           or pytest.fail((r.switch_index, pos)), draft_max_tokens=DRAFT, max_new_tokens=NEW)


def test_draft_shorter_than_window(early, tmp_path):
    pair, pos = _pilot_with_eos(early, tmp_path, 1, 5)
    _check(pair, lambda r: (not r.switched and r.switch_index == pos < 6)
           or pytest.fail(r.switch_index), draft_max_tokens=DRAFT, max_new_tokens=NEW)


def test_different_tokenizers(cross):
    ref = ReferenceWSD(*cross)
    assert not ref.identity
    probe = ref.generate(PROMPT, draft_max_tokens=DRAFT, max_new_tokens=NEW, threshold=0.999999)
    assert probe.draft_base_ids != probe.draft_ids     # really re-tokenized
    gamma, k = _threshold_between(probe.logp, 4, 12)
    _check(cross, lambda r: (r.switched and r.switch_index == k) or pytest.fail(r.switch_index),
           draft_max_tokens=DRAFT, max_new_tokens=NEW, threshold=gamma, window=4)
    # and with no switch: the whole re-encoded draft is kept
    _check(cross, lambda r: (not r.switched and r.switch_index == len(r.draft_base_ids) > 0)
           or pytest.fail(r.switch_index), chunks=(1, 8, 64), draft_max_tokens=40,
           max_new_tokens=NEW, threshold=0.999999)


def test_stop_string_truncation(mid):
    ref = ReferenceWSD(*mid).generate(PROMPT, draft_max_tokens=DRAFT, max_new_tokens=NEW, stop=())
    draft_text = ReferenceWSD(*mid).base_tok.decode(ref.token_ids[:ref.switch_index])
    cont = ref.text[len(draft_text):]
    stop = next(cont[i:i + 2] for i in range(12, len(cont) - 2)
                if cont[i:i + 2].strip() == cont[i:i + 2] and cont[i:i + 2] not in cont[:i + 1]
                and cont[i:i + 2] not in draft_text)
    got = _check(mid, lambda r: (r.finish_reason == "stop" and stop not in r.text)
                 or pytest.fail(r.finish_reason), draft_max_tokens=DRAFT, max_new_tokens=NEW,
                 stop=(stop, "never-seen-stop"))
    assert ref.text.startswith(got.text) and len(got.text) < len(ref.text)


def test_stream_pieces_join_to_text(mid, never):
    for pair, stop in ((mid, ()), (never, None)):
        wsd = WSD.from_pretrained(*pair)
        params = WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW, chunk=4,
                           **({"stop": stop} if stop is not None else {}))
        pieces = list(wsd.stream(PROMPT, params))
        assert len(pieces) > 3 and all(pieces)
        assert "".join(pieces) == wsd.last_result.text == wsd.generate(PROMPT, params).text


def test_results_and_batch(mid):
    wsd = WSD.from_pretrained(*mid)
    params = WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW)
    rs = wsd.generate([PROMPT, [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi there"}]], params)
    assert isinstance(rs, list) and len(rs) == 2
    r = rs[0]
    assert r.switched and r.draft_tokens >= r.switch_index
    assert len(r.token_ids) == r.switch_index + r.base_tokens
    assert set(r.timings) >= {"queued", "prefill", "drafting", "scoring",
                              "continuation", "total"}
    assert r.tokens_per_second > 0
    assert r.draft_text and r.text.startswith(r.draft_text)
    assert rs[1].token_ids != r.token_ids


def test_sampling_reproducible_and_chunk_invariant(mid):
    wsd = WSD.from_pretrained(*mid)
    base = dict(draft_max_tokens=DRAFT, max_new_tokens=48, temperature=0.8, top_p=0.95,
                top_k=50)
    a = wsd.generate(PROMPT, WSDParams(seed=1, chunk=8, **base))
    b = wsd.generate(PROMPT, WSDParams(seed=1, chunk=3, **base))
    c = wsd.generate(PROMPT, WSDParams(seed=2, chunk=8, **base))
    assert a.token_ids == b.token_ids and a.switch_index == b.switch_index
    assert c.token_ids != a.token_ids
    greedy = wsd.generate(PROMPT, WSDParams(
        draft_max_tokens=DRAFT, max_new_tokens=48,
        pilot_sampling=SamplingParams(), base_sampling=SamplingParams(temperature=0.0)))
    assert greedy.token_ids == wsd.generate(PROMPT, WSDParams(draft_max_tokens=DRAFT,
                                                              max_new_tokens=48)).token_ids


@pytest.mark.parametrize("kw, match", [
    (dict(window=0), "window"), (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"), (dict(threshold=float("nan")), "threshold"),
    (dict(draft_max_tokens=0), "draft_max_tokens"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(chunk=0), "chunk"), (dict(stop=[3]), "stop"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_params(kw, match):
    with pytest.raises(RequestError, match=match):
        WSDParams(**kw)


def test_bad_requests_leave_engine_usable(mid):
    wsd = WSD.from_pretrained(*mid)
    params = WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW)
    good = wsd.generate(PROMPT, params)
    bad = ["", "   ", [], [{"role": "robot", "content": "hi"}], [{"content": "x"}],
           [{"role": "user", "content": ""}]]
    for prompt in bad:
        with pytest.raises(RequestError):
            wsd.generate(prompt, params)
    with pytest.raises(ContextOverflowError, match="pilot prompt .* exceeds"):
        wsd.generate("word " * 500, params)          # fits by characters, not by tokens
    with pytest.raises(ContextOverflowError, match="the prompt has 4000000 characters"):
        wsd.generate("x" * 4_000_000, params)        # refused before it is tokenized
    with pytest.raises(ContextOverflowError, match="max_new_tokens"):
        wsd.generate(PROMPT, WSDParams(draft_max_tokens=DRAFT, max_new_tokens=100000))
    with pytest.raises(RequestError, match="WSDParams"):
        wsd.generate(PROMPT, {"window": 6})
    # an error in the middle of a stream, then a normal request
    it = wsd.stream(PROMPT, params)
    next(it)
    it.close()
    assert wsd.generate(PROMPT, params).token_ids == good.token_ids


def test_models_on_different_devices_refused(mid):
    wsd = WSD.from_pretrained(*mid)
    with pytest.raises(ConfigError, match="same device"):
        WSD(wsd.pilot, dataclasses.replace(wsd.base, device=torch.device("meta")))


def test_token_level_generate_ids_matches_text_api(mid, tmp_path):
    """generate_ids on prompt ids == generate on text; models without tokenizers work
    token-level (no text), and force_switch / ignore_eos are honoured."""
    wsd = WSD.from_pretrained(*mid)
    params = WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW)
    r = wsd.generate(PROMPT, params)
    from wsd_engine.tokenization import apply_chat_template, render_base_prompt
    msgs = [{"role": "user", "content": PROMPT}]
    p_ids = apply_chat_template(wsd.pilot.tokenizer, msgs)
    b_ids = render_base_prompt(wsd.base.tokenizer, msgs)
    assert wsd.generate_ids(p_ids, b_ids, params).token_ids == r.token_ids
    bare = []
    for src, name in zip(mid, ("p", "b")):
        dst = tmp_path / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenizer*", "special*",
                                                                "chat_template*"))
        bare.append(str(dst))
    tl = WSD.from_pretrained(*bare)
    t = tl.generate_ids(p_ids, b_ids, params)
    assert (t.token_ids, t.switch_index, t.text) == (r.token_ids, r.switch_index, "")
    with pytest.raises(Exception, match="generate_ids"):
        tl.generate(PROMPT, params)
    f = tl.generate_ids(p_ids, b_ids, WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW,
                                                force_switch=20, ignore_eos=True))
    assert f.switched and f.switch_index == 20 and len(f.token_ids) == NEW
    n = tl.generate_ids(p_ids, b_ids, WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW,
                                                force_switch=0))
    assert not n.switched and n.switch_index == DRAFT


@pytest.mark.parametrize("kw,want_k", [({}, None), ({"force_switch": 5, "ignore_eos": True}, 5),
                                       ({"force_switch": 0, "ignore_eos": True}, DRAFT)])
def test_reference_token_level_matches_engine(mid, tok, tmp_path, kw, want_k):
    """generate_ids of the reference (transformers models built in memory, no tokenizers)
    against the engine's token-level generate_ids: the real rule, a forced switch, and
    "never" with EOS ignored (both models run to their caps)."""
    from transformers import AutoModelForCausalLM

    from wsd_engine.tokenization import apply_chat_template, render_base_prompt
    msgs = [{"role": "user", "content": PROMPT}]
    p_ids = apply_chat_template(tok, msgs)
    b_ids = render_base_prompt(tok, msgs, None)
    eng = WSD.from_pretrained(*(without_tokenizer(p, str(tmp_path / os.path.basename(p)))
                                for p in mid))
    assert not eng.text_mode
    hf = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, local_files_only=True)
          for p in mid]
    ref = ReferenceWSD.from_models(*hf)
    r = ref.generate_ids(p_ids, b_ids, draft_max_tokens=DRAFT, max_new_tokens=NEW, **kw)
    for chunk in (3, 8):
        e = eng.generate_ids(p_ids, b_ids, WSDParams(draft_max_tokens=DRAFT, max_new_tokens=NEW,
                                                     chunk=chunk, **kw))
        assert (e.switch_index, e.switched, e.token_ids) == \
            (r.switch_index, r.switched, r.token_ids)
    if want_k is None:             # the rule fires (the same pair as the text tests)
        assert r.switched and 6 <= r.switch_index < DRAFT
    else:
        assert r.switch_index == want_k and r.switched == (want_k == 5)
    if kw.get("ignore_eos"):
        assert len(r.draft_ids) == DRAFT and len(r.token_ids) == NEW
    assert set(r.timings) == {"draft", "score", "continuation", "total"}
    assert r.text == "" and r.finish_reason in ("eos", "length")


def test_reference_without_tokenizers_refuses_text(mid):
    from transformers import AutoModelForCausalLM
    hf = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, local_files_only=True)
          for p in mid]
    ref = ReferenceWSD.from_models(*hf)
    with pytest.raises(ValueError, match="use generate_ids"):
        ref.generate(PROMPT)
    with pytest.raises(ValueError, match="both tokenizers or neither"):
        ReferenceWSD.from_models(*hf, pilot_tok=object())


def test_ignore_eos_runs_past_real_eos_tokens_in_both(never, tmp_path):
    """ignore_eos with a pilot whose EOS id really occurs in its draft: the reference must
    run to the caps too (transformers' generate would put the EOS ids back from the
    generation config), and the engine equals it."""
    pair, pos = _pilot_with_eos(never, tmp_path, 5, 20)
    ref = ReferenceWSD(*pair)
    msgs = [{"role": "user", "content": PROMPT}]
    from wsd_engine.tokenization import apply_chat_template, render_base_prompt
    p_ids = apply_chat_template(ref.pilot_tok, msgs)
    b_ids = render_base_prompt(ref.base_tok, msgs, None)
    r = ref.generate_ids(p_ids, b_ids, draft_max_tokens=DRAFT, max_new_tokens=NEW,
                         force_switch=30, ignore_eos=True)
    assert len(r.draft_ids) == DRAFT > pos and len(r.token_ids) == NEW
    e = WSD.from_pretrained(*pair).generate_ids(p_ids, b_ids, WSDParams(
        draft_max_tokens=DRAFT, max_new_tokens=NEW, force_switch=30, ignore_eos=True))
    assert (e.token_ids, e.switch_index) == (r.token_ids, r.switch_index)
