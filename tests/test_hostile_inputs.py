"""Inputs an adversarial review found still hurting: each is refused fast, with a specific
error, before it costs memory or time (FIFOs, huge headers and indexes, JSON bombs, huge
eos lists, tokenizers that fail at encode time or quote megabytes, bad devices and paths)."""
import json
import os
import shutil
import struct
import time

import pytest

from wsd_engine import (WSD, ConfigError, ContextOverflowError, ModelLoadError, RequestError,
                        TokenizerError, WSDParams, load_model)
from wsd_engine.config import ModelConfig
from wsd_engine.synthetic import make_model, make_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("good") / "m"), "llama",
                      tokenizer=make_tokenizer(320))


@pytest.fixture
def copy(good, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(good, dst)
    return dst


def _fast(fn, exc, match, seconds=5.0):
    t0 = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    assert time.perf_counter() - t0 < seconds


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_weights_is_never_opened(copy):
    os.remove(os.path.join(copy, "model.safetensors"))
    os.mkfifo(os.path.join(copy, "weights.safetensors"))       # opening it would block
    _fast(lambda: load_model(copy), ModelLoadError, "has no model.safetensors")
    os.mkfifo(os.path.join(copy, "model.safetensors"))
    _fast(lambda: load_model(copy), ModelLoadError, "not a regular file|has no model")


def test_a_huge_safetensors_header_is_refused_before_parsing(copy):
    with open(os.path.join(copy, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 90 << 20) + b"{" + b" " * 1000)
    _fast(lambda: load_model(copy), ModelLoadError, "header is 94,371,840 bytes")


def test_an_index_naming_too_many_tensors_or_shards(copy):
    index = os.path.join(copy, "model.safetensors.index.json")
    json.dump({"weight_map": {f"t{i}": "model.safetensors" for i in range(70000)}},
              open(index, "w"))
    _fast(lambda: load_model(copy), ModelLoadError, "names 70000 tensors")
    json.dump({"weight_map": {f"t{i}": f"s{i}.safetensors" for i in range(5000)}},
              open(index, "w"))
    _fast(lambda: load_model(copy), ModelLoadError, "names 5000 shard files")


def test_json_bombs_in_configs(copy):
    cfg_path = os.path.join(copy, "config.json")
    cfg = json.load(open(cfg_path))
    with open(cfg_path, "w") as f:          # 3 MB of "{}": 1.5M objects once parsed
        f.write(json.dumps(cfg)[:-1] + ', "junk": [' + ",".join(["{}"] * 1_500_000) + "]}")
    _fast(lambda: load_model(copy), ConfigError, "JSON objects or arrays")
    json.dump(cfg, open(cfg_path, "w"))
    tc = os.path.join(copy, "tokenizer_config.json")
    t = json.load(open(tc))
    t["junk"] = [{}] * 200_000
    json.dump(t, open(tc, "w"))
    _fast(lambda: load_model(copy).tokenizer, TokenizerError, "JSON objects or arrays")


def test_eos_lists_are_bounded(copy):
    path = os.path.join(copy, "generation_config.json")
    json.dump({"eos_token_id": list(range(2000))}, open(path, "w"))
    _fast(lambda: ModelConfig.from_pretrained(copy), ConfigError, "lists 2000 token ids")
    json.dump({"eos_token_id": list(range(1000))}, open(path, "w"))
    assert len(ModelConfig.from_pretrained(copy).eos_token_ids) == 1000


def test_tokenizer_errors_are_short_and_specific(copy):
    tc = os.path.join(copy, "tokenizer_config.json")
    t = json.load(open(tc))
    t["padding_side"] = "x" * 1_000_000
    json.dump(t, open(tc, "w"))
    with pytest.raises(TokenizerError) as e:
        load_model(copy).tokenizer
    assert len(str(e.value)) < 1000


def test_a_tokenizer_failing_at_encode_time_is_a_tokenizer_error(good, tmp_path):
    """WordPiece without an [UNK] token loads, then raises a plain Exception on unknown
    text: the engine reports a TokenizerError and stays usable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pilot, base = str(tmp_path / "pilot"), str(tmp_path / "base")
    shutil.copytree(good, pilot)
    shutil.copytree(good, base)
    vocab = {"<s>": 1, "</s>": 2, "[": 3, "User": 4, "]": 5, "hi": 6}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    bad = PreTrainedTokenizerFast(tokenizer_object=wp, bos_token="<s>", eos_token="</s>")
    for f in os.listdir(base):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(os.path.join(base, f))
    bad.save_pretrained(base)
    wsd = WSD.from_pretrained(pilot, base)
    with pytest.raises(TokenizerError, match="tokenizer failed on this text"):
        wsd.generate("zebra crossing", WSDParams(draft_max_tokens=4, max_new_tokens=6))


@pytest.mark.parametrize("device", ["meta", "mps", "foo", "cpu:x", 5, None])
def test_bad_devices(good, device):
    _fast(lambda: load_model(good, device=device), ConfigError, "unsupported device")


@pytest.mark.parametrize("path", [b"/tmp", None, 5, "caf\udce9"])
def test_bad_paths(path):
    with pytest.raises(ConfigError):
        load_model(path)


def test_model_generate_arguments(good):
    m = load_model(good)
    for kw in (dict(max_new_tokens=True), dict(eos_token_ids=5), dict(eos_token_ids=["a"]),
               dict(stop_at_eos="yes")):
        with pytest.raises(RequestError):
            m.generate([5, 6], **kw)
    assert len(m.generate([5, 6], max_new_tokens=3, eos_token_ids=[], stop_at_eos=True)) == 3


def test_a_limit_that_can_never_fit_is_named(good):
    wsd = WSD.from_pretrained(good, good)
    with pytest.raises(ContextOverflowError, match="max_new_tokens=1000000000000 leaves no room"):
        wsd.generate("Hi", WSDParams(draft_max_tokens=8, max_new_tokens=10**12))
    with pytest.raises(RequestError, match="base_template's output"):
        WSD(wsd.pilot, load_model(good), base_template=lambda m: "x\udc80").generate(
            "Hi", WSDParams(draft_max_tokens=4, max_new_tokens=8))
