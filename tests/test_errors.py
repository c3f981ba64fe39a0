"""Bad checkpoints and bad requests: a specific exception whose message says what to fix,
and the engine still usable afterwards."""
import json
import os
import shutil

import pytest
import torch

from wsd_engine import (ConfigError, ContextOverflowError, ModelLoadError, RequestError,
                        TokenizerError, UnsupportedModelError, load_model)
from wsd_engine.synthetic import make_model, make_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return make_model(str(root / "m"), "llama", tokenizer=make_tokenizer(320), init_scale=5.0)


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(good, dst)
    return str(dst)


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_missing_config(copy):
    os.remove(os.path.join(copy, "config.json"))
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(copy)


def test_unsupported_architecture(copy):
    _edit_config(copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model(copy)


def test_unsupported_rope_scaling(copy):
    _edit_config(copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="yarn.*llama3"):
        load_model(copy)


def test_old_style_rope_keys_are_read(copy, good):
    cfg = json.load(open(os.path.join(copy, "config.json")))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = None
    json.dump(cfg, open(os.path.join(copy, "config.json"), "w"))
    ids = list(range(3, 40))
    torch.testing.assert_close(load_model(copy).score(ids), load_model(good).score(ids))


def test_mistral_sliding_window_shorter_than_cache(tmp_path):
    p = make_model(str(tmp_path / "mis"), "mistral", sliding_window=64)
    with pytest.raises(UnsupportedModelError, match="max_seq_len <= 64"):
        load_model(p, max_seq_len=128)
    assert load_model(p).max_seq_len == 64           # default fits the window


def test_corrupt_header(copy):
    f = os.path.join(copy, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[8:40] = b"{not json at all!!" + b" " * 14
    open(f, "wb").write(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(copy)


def test_truncated_shard(copy):
    f = os.path.join(copy, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(copy)


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(copy):
    _rewrite(copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj"):
        load_model(copy)


def test_wrong_shape_and_unexpected_listed_together(copy):
    def fn(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.randn(64, 32)
        t["model.layers.0.extra.weight"] = torch.randn(3)
    _rewrite(copy, fn)
    with pytest.raises(ModelLoadError) as e:
        load_model(copy)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight has shape (64, 32), config says (128, 64)" in msg
    assert "unexpected tensor(s)" in msg and "model.layers.0.extra.weight" in msg


def test_index_names_missing_shard(tmp_path):
    p = make_model(str(tmp_path / "sh"), "llama", max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
    os.remove(os.path.join(p, shards[-1]))
    with pytest.raises(ModelLoadError, match=f"not in .*{shards[-1]}"):
        load_model(p)


def test_pickle_only_checkpoint_refused(copy):
    os.remove(os.path.join(copy, "model.safetensors"))
    with open(os.path.join(copy, "pytorch_model.bin"), "wb") as f:
        f.write(b"this would be a pickle; it must never be opened")
    with pytest.raises(ModelLoadError, match="pickle.*never unpickles"):
        load_model(copy)


def test_missing_tokenizer(tmp_path):
    p = make_model(str(tmp_path / "notok"), "llama")
    m = load_model(p)
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        m.tokenizer
    assert len(m.generate([5, 6, 7], max_new_tokens=3, stop_at_eos=False)) == 3


def test_prompt_longer_than_cache_then_still_usable(good):
    m = load_model(good, max_seq_len=64)
    ref = m.generate(list(range(3, 20)), max_new_tokens=8, stop_at_eos=False)
    with pytest.raises(ContextOverflowError, match="does not fit the KV cache of 64"):
        m.score(list(range(3, 3 + 65)))
    with pytest.raises(ContextOverflowError, match="larger max_seq_len"):
        m.generate(list(range(3, 3 + 60)), max_new_tokens=8)
    assert m.generate(list(range(3, 20)), max_new_tokens=8, stop_at_eos=False) == ref


@pytest.mark.parametrize("bad", [[], [-1, 3], [3, 10**6], ["a"], torch.zeros(2, 2)])
def test_bad_token_ids(good, bad):
    m = load_model(good)
    with pytest.raises(RequestError):
        m.score(bad)


def test_bad_options(good):
    with pytest.raises(ConfigError, match="unknown backend"):
        load_model(good, backend="cuda-magic")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        load_model(good, dtype=torch.int8)
    with pytest.raises(RequestError, match="max_new_tokens"):
        load_model(good).generate([3, 4], max_new_tokens=0)


def test_import_needs_no_triton():
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None; import wsd_engine; "
            "assert 'wsd_engine.kernels' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
