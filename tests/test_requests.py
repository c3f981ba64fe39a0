"""Bad requests: each gets a specific exception that says how to fix it, nothing reaches
the device unchecked, and the engine gives the same answers afterwards."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd_engine import (WSD, ConfigError, ContextOverflowError, RequestError, SamplingParams,
                        TokenizerError, WSDParams, load_model)
from wsd_engine.synthetic import make_tokenizer, make_wsd_pair

PROMPT = "Tell me about the quick brown fox."
SMALL = dict(draft_max_tokens=12, max_new_tokens=20)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_wsd_pair(str(tmp_path_factory.mktemp("req")), sharpen=100.0, damp=0.02,
                         perturb=0.05, tokenizer=make_tokenizer(320))


@pytest.fixture(scope="module")
def wsd(pair):
    return WSD.from_pretrained(*pair)


@pytest.fixture(scope="module")
def good(wsd):
    return wsd.generate(PROMPT, WSDParams(**SMALL)).token_ids


def _still_good(wsd, good):
    assert wsd.generate(PROMPT, WSDParams(**SMALL)).token_ids == good


def _nested(depth):
    x = [{"role": "user", "content": "hi"}]
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("prompt, match", [
    (_nested(3000), "must be a dict"),
    ("caf\udce9", "lone surrogate"),
    ([{"role": "user", "content": "ok \ud800"}], "lone surrogate"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    ([{"role": ["user"], "content": "x"}], "unknown role"),
    (None, "non-empty string"),
    (12, "non-empty string"),
    ([], "non-empty string"),
])
def test_bad_prompts(wsd, good, prompt, match):
    with pytest.raises(RequestError, match=match):
        wsd.generate(prompt, WSDParams(**SMALL))
    with pytest.raises(RequestError, match=match):
        list(wsd.stream(prompt, WSDParams(**SMALL)))
    _still_good(wsd, good)


@pytest.mark.parametrize("ids", [[2**70], [None], None, "abc", [1.5], [True], [-3], 7,
                                 torch.tensor([[1, 2], [3, 4]]), torch.tensor([1.0])])
def test_bad_token_ids_never_reach_the_device(wsd, good, ids):
    with pytest.raises(RequestError):
        wsd.generate_ids(ids, [1, 5, 6], WSDParams(**SMALL))
    with pytest.raises(RequestError):
        wsd.base.score(ids)
    _still_good(wsd, good)


def test_numpy_and_tensor_ids_are_fine(wsd):
    a = wsd.base.score([1, 5, 6])
    torch.testing.assert_close(wsd.base.score(np.array([1, 5, 6])), a)
    torch.testing.assert_close(wsd.base.score([np.int64(1), np.int32(5), 6]), a)
    torch.testing.assert_close(wsd.base.score(torch.tensor([1, 5, 6], dtype=torch.int32)), a)


def test_params_changed_after_construction_are_checked_and_used(wsd, good):
    p = WSDParams(**SMALL)
    p.chunk = 0                                   # used to hang
    with pytest.raises(RequestError, match="chunk"):
        wsd.generate(PROMPT, p)
    p = WSDParams(**SMALL)
    p.max_new_tokens = -5                         # used to be a raw RuntimeError
    with pytest.raises(RequestError, match="max_new_tokens"):
        wsd.generate(PROMPT, p)
    p = WSDParams(**SMALL)
    p.stop = [3]
    with pytest.raises(RequestError, match="stop"):
        wsd.generate(PROMPT, p)
    p = WSDParams(**SMALL, pilot_sampling=SamplingParams())
    p.pilot_sampling.temperature = -1.0
    with pytest.raises(RequestError, match="temperature"):
        wsd.generate(PROMPT, p)
    p = WSDParams(**SMALL, seed=3)
    p.temperature = 5.0                           # used to be silently ignored
    hot = wsd.generate(PROMPT, p)
    assert hot.token_ids == wsd.generate(PROMPT, WSDParams(**SMALL, seed=3,
                                                           temperature=5.0)).token_ids
    assert hot.token_ids != good
    _still_good(wsd, good)


def test_tiny_temperature_is_the_argmax(wsd, good):
    """1e-38 is a valid temperature: it samples the argmax (it used to give token 0)."""
    r = wsd.generate(PROMPT, WSDParams(**SMALL, temperature=1e-38, seed=5))
    assert r.token_ids == good


def test_one_model_as_pilot_and_base_refused(wsd):
    with pytest.raises(ConfigError, match="load the checkpoint twice"):
        WSD(wsd.base, wsd.base)
    with pytest.raises(ConfigError, match="must be a Model"):
        WSD("pilot_dir", wsd.base)


def test_params_list_must_match_prompts(wsd):
    with pytest.raises(RequestError, match="2 prompts but 3 params"):
        wsd.generate([PROMPT, "Hi"], [WSDParams(**SMALL)] * 3)
    with pytest.raises(RequestError, match="list of params needs a list of prompts"):
        wsd.generate(PROMPT, [WSDParams(**SMALL)])
    a, b = wsd.generate([PROMPT, "Hi"], [WSDParams(**SMALL), WSDParams(**SMALL, seed=1,
                                                                        temperature=0.7)])
    assert a.token_ids == wsd.generate(PROMPT, WSDParams(**SMALL)).token_ids


def _copy_pair(pair, tmp_path):
    out = []
    for name, src in zip(("pilot", "base"), pair):
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        out.append(dst)
    return out


def test_tokenizer_larger_than_the_embedding(pair, tmp_path):
    """Tokenizer files that do not belong to the checkpoint: ids past the embedding are a
    TokenizerError, never an IndexError (on CUDA: a device-side assert)."""
    pilot, base = _copy_pair(pair, tmp_path)
    big = make_tokenizer(420)
    for d in (pilot, base):
        big.save_pretrained(d)
    wsd = WSD.from_pretrained(pilot, base)
    text = " ".join(big.convert_ids_to_tokens(list(range(330, 420)))).replace("\u0120", " ")
    with pytest.raises(TokenizerError, match="does not belong|do not belong"):
        wsd.generate(text, WSDParams(**SMALL))


def test_chat_template_rendering_nothing(pair, tmp_path):
    pilot, base = _copy_pair(pair, tmp_path)
    cfg_path = os.path.join(pilot, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = "{% if false %}{{ messages }}{% endif %}"
    json.dump(cfg, open(cfg_path, "w"))
    for f in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(pilot, f)):
            os.remove(os.path.join(pilot, f))
    wsd = WSD.from_pretrained(pilot, base)
    with pytest.raises(TokenizerError, match="empty"):
        wsd.generate(PROMPT, WSDParams(**SMALL))


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                    st.lists(st.integers(0, 3), max_size=3))
_FIELDS = ("window", "threshold", "draft_max_tokens", "max_new_tokens", "temperature",
           "top_p", "top_k", "seed", "chunk", "stop", "ignore_eos", "force_switch")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_param_values(wsd, good, data):
    """Random values for random fields, given at construction or set afterwards: either a
    RequestError (ContextOverflowError for lengths past the cache) or a normal result."""
    changes = data.draw(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=3))
    late = data.draw(st.booleans())
    try:
        if late:
            p = WSDParams(**SMALL)
            for k, v in changes.items():
                setattr(p, k, v)
        else:
            p = WSDParams(**{**SMALL, **changes})
        r = wsd.generate(PROMPT, p)
    except RequestError:
        return
    assert r.finish_reason in ("eos", "stop", "length")
    assert len(r.token_ids) <= p.max_new_tokens


def test_mutating_params_does_not_change_a_running_stream(wsd):
    """Params are copied when a request starts: changing them mid-stream has no effect."""
    p = WSDParams(draft_max_tokens=12, max_new_tokens=30, stop=())
    want = wsd.generate(PROMPT, dataclasses.replace(p)).text
    gen = wsd.stream(PROMPT, p)
    first = next(gen)
    p.max_new_tokens, p.temperature = 1000, 3.0
    assert first + "".join(gen) == want


def test_context_overflow_is_a_request_error(wsd):
    with pytest.raises(ContextOverflowError):
        wsd.generate(PROMPT, WSDParams(draft_max_tokens=10, max_new_tokens=10**6))
    assert issubclass(ContextOverflowError, RequestError)


def test_loaded_model_used_by_two_engines(pair):
    """Two engines over the same base model object interleave safely."""
    base = load_model(pair[1])
    e1, e2 = WSD(load_model(pair[0]), base), WSD(load_model(pair[0]), base)
    want = e1.generate(PROMPT, WSDParams(**SMALL)).token_ids
    g = e1.stream(PROMPT, WSDParams(**SMALL, stop=()))
    next(g)
    assert e2.generate("Hi", WSDParams(**SMALL)).token_ids
    list(g)
    assert e1.last_result.token_ids == want


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json",
                                  "chat_template.jinja", "special_tokens_map.json"])
def test_tokenizer_file_linking_outside_the_folder_is_never_read(pair, tmp_path, monkeypatch,
                                                                  name):
    """A tokenizer file that is a symlink to a file outside the checkpoint folder (one that
    would load fine) is refused before anything opens it."""
    import builtins
    from wsd_engine.tokenization import load_tokenizer
    pilot, _ = _copy_pair(pair, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / name
    src = os.path.join(pilot, name)
    if os.path.exists(src):
        shutil.move(src, target)
    else:
        target.write_text("{{ messages[0]['content'] }}")
    os.symlink(target, src)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)),
                                                              real_open(f, *a, **k))[1])
    with pytest.raises(TokenizerError, match="outside the checkpoint folder"):
        load_tokenizer(pilot)
    assert not any(str(outside) in f for f in opened)


_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
_MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user",
                                                                    "assistant"]), _VALUES),
                                  "content": st.one_of(_TEXT, _VALUES)})
_PROMPTS = st.one_of(_TEXT, _VALUES, st.lists(_MESSAGE, max_size=4),
                     st.lists(st.one_of(_TEXT, st.lists(_MESSAGE, max_size=2)), max_size=3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(prompt=_PROMPTS)
def test_any_prompt(wsd, prompt):
    """Random prompts (any text, lone surrogates included; messages with any roles and
    contents; lists of them): a RequestError, or results with text."""
    params = WSDParams(draft_max_tokens=4, max_new_tokens=6)
    try:
        out = wsd.generate(prompt, params)
    except RequestError:
        return
    for r in out if isinstance(out, list) else [out]:
        assert isinstance(r.text, str) and len(r.token_ids) <= 6
