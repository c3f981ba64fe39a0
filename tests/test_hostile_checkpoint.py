"""A checkpoint folder from the internet is untrusted input: every way its config.json,
generation_config.json, index or safetensors headers can be wrong or hostile ends in a
specific exception (ConfigError family or ModelLoadError) with a short message, before any
large allocation or tensor read, without opening a file outside the folder, and the engine
still loads a good checkpoint afterwards."""
import builtins
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import wsd_engine
from wsd_engine import ConfigError, ModelConfig, ModelLoadError, UnsupportedModelError, load_model
from wsd_engine.synthetic import make_model

IDS = [3, 4, 5, 6, 7]
MAX_MESSAGE = 1000          # a hostile value never makes a long message
# derandomized, without an example database: the same examples on every run
HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


# ---- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("good") / "m"), "llama")


@pytest.fixture(scope="module")
def ref(good):
    """The good checkpoint's logits, computed before any hostile load ran."""
    return load_model(good).score(IDS)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("sharded") / "m"), "llama",
                      max_shard_size="40KB")


@pytest.fixture
def ckpt(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return str(dst)


@pytest.fixture
def sh_ckpt(sharded, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(sharded, dst)
    return str(dst)


def _load(folder, name="config.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _write(folder, data, name="config.json", raw=None):
    """Write `data` as JSON; the string "__RAW__" anywhere in it is replaced by the JSON
    text `raw` (for literals json.dump cannot write: 1e400, huge ints, deep nesting)."""
    text = json.dumps(data)
    if raw is not None:
        text = text.replace('"__RAW__"', raw)
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def _set(folder, key, value=None, raw=None, name="config.json"):
    data = _load(folder, name)
    data[key] = "__RAW__" if raw is not None else value
    _write(folder, data, name, raw)


def _set_rope(folder, params, old_style=False, raw=None):
    """Replace the RoPE settings: transformers >= 5 style (`rope_parameters`) or the older
    top-level `rope_theta` + `rope_scaling`."""
    cfg = _load(folder)
    cfg.pop("rope_parameters", None)
    if old_style:
        params = dict(params)
        cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
        cfg["rope_scaling"] = params or None
    else:
        cfg["rope_parameters"] = params
    _write(folder, cfg, raw=raw)


def _config_error(folder, match=None, cls=ConfigError, **kw):
    with pytest.raises(cls, match=match) as e:
        load_model(folder, **kw)
    assert len(str(e.value)) < MAX_MESSAGE, str(e.value)[:3000]
    return str(e.value)


def _finite_load(folder):
    m = load_model(folder)
    logits = m.score(IDS[:m.max_seq_len])
    assert torch.isfinite(logits).all()
    return logits


# ---- 1. config values of the wrong type or value --------------------------------------------

BAD_NUMBERS = ['"abc"', "Infinity", "NaN", "-Infinity", "1e400", "[1]", '{"a": 1}', "true",
               "false", "1" * 60, "-" + "1" * 60, "1" * 4000, "2.5", "[[[[[[[[[[1]]]]]]]]]]"]
INT_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "bos_token_id"]


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("raw", BAD_NUMBERS)
def test_int_key_bad_value(ckpt, key, raw):
    _set(ckpt, key, raw=raw)
    msg = _config_error(ckpt)
    assert key in msg and "integer" in msg


@pytest.mark.parametrize("raw", ['"abc"', "Infinity", "NaN", "1e400", '{"a": 1}', "true", "2.5",
                                 "[1, 2.5]", '[1, "x"]', "[[1]]", "1" * 4000, "-3"])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_eos_token_id_bad_value(ckpt, raw, name):
    _set(ckpt, "eos_token_id", raw=raw, name=name)
    msg = _config_error(ckpt)
    assert "eos_token_id" in msg and name in msg and "integer" in msg


@pytest.mark.parametrize("raw", ['"abc"', "Infinity", "2.5", "[1]", "true"])
def test_generation_config_bos_bad_value(ckpt, raw):
    _set(ckpt, "bos_token_id", None)          # config.json's wins when set
    _set(ckpt, "bos_token_id", raw=raw, name="generation_config.json")
    msg = _config_error(ckpt)
    assert "bos_token_id" in msg and "generation_config.json" in msg


@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta"])
@pytest.mark.parametrize("raw", ['"abc"', "Infinity", "NaN", "1e400", "[1]", '{"a": 1}', "true",
                                 "1" * 4000, "-" + "1" * 4000])
def test_float_key_bad_value(ckpt, key, raw):
    if key == "rope_theta":
        _set_rope(ckpt, {"rope_type": "default", "rope_theta": "__RAW__"}, raw=raw)
    else:
        _set(ckpt, key, raw=raw)
    msg = _config_error(ckpt)
    assert key in msg and "number" in msg


@pytest.mark.parametrize("key", ["tie_word_embeddings", "attention_bias", "mlp_bias"])
@pytest.mark.parametrize("raw", ['"abc"', "1", "0", "[1]", '{"a": 1}', "1.5"])
def test_bool_key_bad_value(ckpt, key, raw):
    _set(ckpt, key, raw=raw)
    msg = _config_error(ckpt)
    assert key in msg and "true or false" in msg


@pytest.mark.parametrize("key", ["hidden_act", "dtype", "torch_dtype", "model_type",
                                 "architectures"])
@pytest.mark.parametrize("raw", ["5", "[1]", '{"a": 1}', "true", "NaN", "[[[[[[[[1]]]]]]]]"])
def test_string_key_bad_value(ckpt, key, raw):
    if key == "torch_dtype":
        _set(ckpt, "dtype", None)
    if key == "model_type":
        _set(ckpt, "architectures", None)
    _set(ckpt, key, raw=raw)
    msg = _config_error(ckpt)
    assert key in msg


@pytest.mark.parametrize("key", ["hidden_act", "dtype", "rope_type", "architectures"])
def test_huge_string_gives_a_short_message(ckpt, key):
    big = "x" * 1_000_000
    if key == "rope_type":
        _set_rope(ckpt, {"rope_type": big, "rope_theta": 10000.0})
    else:
        _set(ckpt, key, [big] if key == "architectures" else big)
    _config_error(ckpt)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_json(ckpt, name, depth):
    _set(ckpt, "eos_token_id", raw="[" * depth + "]" * depth, name=name)
    _config_error(ckpt)


@pytest.mark.parametrize("key,value,cls", [
    ("num_hidden_layers", 1025, UnsupportedModelError),
    ("hidden_size", 65537, UnsupportedModelError),
    ("intermediate_size", (1 << 20) + 1, UnsupportedModelError),
    ("num_attention_heads", 1025, UnsupportedModelError),
    ("num_key_value_heads", 1025, UnsupportedModelError),
    ("head_dim", 514, UnsupportedModelError),
    ("head_dim", 15, ConfigError),
    ("vocab_size", (1 << 22) + 1, UnsupportedModelError),
    ("max_position_embeddings", 2 ** 40, UnsupportedModelError),
    ("num_hidden_layers", 0, ConfigError),
    ("hidden_size", -64, ConfigError),
    ("num_key_value_heads", 0, ConfigError),
])
def test_sizes_out_of_range(ckpt, key, value, cls):
    _set(ckpt, key, value)
    assert key in _config_error(ckpt, cls=cls)


def test_head_dim_limit_says_the_largest_supported(ckpt):
    _set(ckpt, "head_dim", 32768)
    _config_error(ckpt, match="head_dim.*512", cls=UnsupportedModelError)


# Every key the config reader reads, with a base config in which it matters: (family,
# overrides of the tiny config, path of the key). The rope keys live in rope_parameters.
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64, "rope_theta": 10000.0}
_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320,
         "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
         "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "dtype": "float32",
         "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": dict(_LLAMA3)}
_KEYS = ([(k,) for k in _BASE] + [(k,) for k in ("torch_dtype", "rope_scaling", "rope_theta",
                                                   "sliding_window", "use_sliding_window")]
         + [("rope_parameters", k) for k in _LLAMA3] + [("rope_parameters", "type"),
                                                       ("rope_parameters", "full_attention")]
         + [("generation_config", "eos_token_id"), ("generation_config", "bos_token_id")])
_FAMILIES = [(["LlamaForCausalLM"], {}),
             (["MistralForCausalLM"], {"sliding_window": 256}),
             (["Qwen2ForCausalLM"], {"use_sliding_window": True, "sliding_window": 256})]

_INTERESTING = st.sampled_from([
    0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 320, 512, 1024, 2 ** 31, 2 ** 63, -1, 10 ** 400,
    0.0, 0.5, 1e-6, 1.0, 4.0, 1e30, 1e300, -1e-6, "float16", "bfloat16", "float64", "silu",
    "gelu", "llama3", "linear", "default", "yarn", "LlamaForCausalLM", "Qwen2ForCausalLM",
    "MistralForCausalLM", "llama", "qwen2", "mistral", "", [], {}, [2, 3], {"rope_type": "linear"},
    {"rope_type": "linear", "factor": 2.0}, dict(_LLAMA3), ["LlamaForCausalLM"]])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | _INTERESTING,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=4),
    max_leaves=6)


def _apply(cfg: dict, gen: dict, key: tuple, value):
    if key[0] == "generation_config":
        gen[key[1]] = value
    elif len(key) == 1:
        cfg[key[0]] = value
    else:
        cfg[key[0]][key[1]] = value


@settings(HYPOTHESIS, max_examples=400)
@given(family=st.sampled_from(_FAMILIES), key=st.sampled_from(_KEYS), value=_JSON)
def test_any_json_value_for_any_key_from_dict(family, key, value):
    """ModelConfig.from_dict: any JSON value for any key gives a config or a ConfigError."""
    cfg = json.loads(json.dumps(_BASE))
    cfg["architectures"], extra = family
    cfg.update(extra)
    gen = {"eos_token_id": 2, "bos_token_id": 1}
    _apply(cfg, gen, key, value)
    try:
        c = ModelConfig.from_dict(cfg, gen)
    except ConfigError as e:
        event(type(e).__name__)
        assert len(str(e)) < MAX_MESSAGE
        return
    event("config")
    assert torch.isfinite(c.rope.inv_freq(c.head_dim)).all()
    assert 0 < c.rms_norm_eps < 1


@pytest.fixture(scope="module")
def hyp_ckpt(good, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("hyp") / "m")
    shutil.copytree(good, dst)
    return dst


@HYPOTHESIS
@given(key=st.sampled_from(_KEYS), value=_JSON)
def test_any_json_value_for_any_key_loads_or_refuses(hyp_ckpt, good, key, value):
    """load_model: a finite-logit model, a ConfigError, or (a plausible value that
    disagrees with the weight files) a ModelLoadError. Nothing else."""
    cfg, gen = _load(good), _load(good, "generation_config.json")
    cfg["rope_parameters"] = dict(_LLAMA3)
    if key[0] in ("rope_scaling", "rope_theta"):
        del cfg["rope_parameters"]          # the older style: top-level keys are read
    _apply(cfg, gen, key, value)
    _write(hyp_ckpt, cfg)
    _write(hyp_ckpt, gen, "generation_config.json")
    try:
        _finite_load(hyp_ckpt)
        event("loaded")
    except (ConfigError, ModelLoadError) as e:
        event(type(e).__name__)
        assert len(str(e)) < MAX_MESSAGE


# ---- 2. values that load today and give NaN logits --------------------------------------------

NAN, INF = float("nan"), float("inf")
_ROPE_CASES = (
    [({"rope_type": "default", "rope_theta": v}, "rope_theta") for v in (NAN, 0.0, -1.0, INF, -INF)]
    + [({"rope_type": "linear", "factor": v, "rope_theta": 1e4}, "factor")
       for v in (0.0, NAN, -2.0, INF)]
    + [({**_LLAMA3, "factor": v}, "factor") for v in (0.0, NAN, -8.0)]
    + [({**_LLAMA3, "low_freq_factor": v}, "low_freq_factor") for v in (0.0, -1.0, NAN)]
    + [({**_LLAMA3, "high_freq_factor": v}, "high_freq_factor") for v in (0.0, -4.0, INF)]
    + [({**_LLAMA3, "low_freq_factor": 2.0, "high_freq_factor": 2.0}, "freq_factor"),
       ({**_LLAMA3, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
       ({**_LLAMA3, "original_max_position_embeddings": -64}, "original_max_position_embeddings")])


@pytest.mark.parametrize("old_style", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("params,key", _ROPE_CASES)
def test_rope_values_that_give_nan_refused(ckpt, params, key, old_style):
    _set_rope(ckpt, params, old_style=old_style)
    assert key in _config_error(ckpt)


@pytest.mark.parametrize("theta", [NAN, 0.0, -1.0])
def test_rope_parameters_full_attention_checked(ckpt, theta):
    _set_rope(ckpt, {"full_attention": {"rope_type": "default", "rope_theta": theta}})
    assert "rope_theta" in _config_error(ckpt)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("value", [[1, 2], "linear", 3, True])
def test_rope_settings_not_an_object(ckpt, key, value):
    cfg = _load(ckpt)
    cfg.pop("rope_parameters")
    cfg[key] = value
    _write(ckpt, cfg)
    assert key in _config_error(ckpt)


def test_rope_full_attention_not_an_object(ckpt):
    _set_rope(ckpt, {"full_attention": [1]})
    assert "full_attention" in _config_error(ckpt)


@pytest.mark.parametrize("eps", [INF, NAN, 0.0, -1e-6, 1.0, 1e10])
def test_rms_norm_eps_refused(ckpt, eps):
    _set(ckpt, "rms_norm_eps", eps)
    assert "rms_norm_eps" in _config_error(ckpt)


_LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}


@pytest.mark.parametrize("params,old_style", [(_LLAMA3, False), (_LLAMA3, True),
                                              (_LINEAR, False), (_LINEAR, True),
                                              ({"full_attention": _LLAMA3}, False)])
def test_valid_rope_settings_still_load(ckpt, params, old_style):
    _set_rope(ckpt, params, old_style=old_style)
    _finite_load(ckpt)


# ---- 3. memory: refuse before building anything as large as the config claims -------------------

_PEAK = r"""
import json, resource, sys
import torch, wsd_engine
from wsd_engine import WSDError, load_model
# a runaway allocation fails fast (MemoryError) instead of swamping a shared machine
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
cap = vm + (3 << 30) if hard == resource.RLIM_INFINITY else min(vm + (3 << 30), hard)
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1], **json.loads(sys.argv[2]))
    kind = "loaded"
except WSDError as e:
    kind = type(e).__name__
except BaseException as e:
    kind = "raw " + type(e).__name__
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kind": kind, "peak_mb": (after - before) / 1024}))
"""


def _failed_load_peak(folder, **kw):
    """(exception class name, MB of peak RSS growth) of load_model in a fresh process."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, folder, json.dumps(kw)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(folder, kw, res, f"{time.perf_counter() - t:.1f}s")
    return res["kind"], res["peak_mb"]


@pytest.mark.parametrize("layers", [10 ** 6, 10 ** 9])
def test_huge_layer_count_refused_with_small_peak(ckpt, layers):
    _set(ckpt, "num_hidden_layers", layers)
    kind, peak = _failed_load_peak(ckpt)
    assert kind == "UnsupportedModelError" and peak < 100


def test_huge_head_dim_checkpoint_refused_with_small_peak(tmp_path):
    p = make_model(str(tmp_path / "hd"), "llama", vocab_size=16, hidden_size=8,
                   intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                   num_key_value_heads=1, head_dim=32768, max_position_embeddings=4096)
    kind, peak = _failed_load_peak(p)
    assert kind == "UnsupportedModelError" and peak < 100


def test_huge_max_seq_len_refused_with_small_peak(good):
    kind, peak = _failed_load_peak(good, max_seq_len=10 ** 12)
    assert kind == "ConfigError" and peak < 100


def test_layer_count_checked_against_files_before_expected_shapes(ckpt, monkeypatch):
    def boom(cfg):
        raise AssertionError("expected_shapes built before the layer count was checked")
    monkeypatch.setattr(wsd_engine.loader, "expected_shapes", boom)
    _set(ckpt, "num_hidden_layers", 1000)
    with pytest.raises(ModelLoadError, match=r"1000.*2 layers"):
        load_model(ckpt)


class _SpyFile:
    """safe_open's handle, recording every tensor whose data is read."""

    def __init__(self, f, reads):
        self._f, self._reads = f, reads

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def get_tensor(self, name):
        self._reads.append(name)
        return self._f.get_tensor(name)

    def get_slice(self, name):
        sl, reads = self._f.get_slice(name), self._reads

        class _Slice:
            def __getattr__(self, attr):
                return getattr(sl, attr)

            def __getitem__(self, idx):
                reads.append(name)
                return sl[idx]
        return _Slice()


@pytest.fixture
def data_reads(monkeypatch):
    import safetensors
    reads, real = [], safetensors.safe_open
    spy = lambda *a, **k: _SpyFile(real(*a, **k), reads)  # noqa: E731
    monkeypatch.setattr(safetensors, "safe_open", spy)
    if hasattr(wsd_engine.loader, "safe_open"):
        monkeypatch.setattr(wsd_engine.loader, "safe_open", spy)
    return reads


def _rewrite(path, fn, name="model.safetensors"):
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, name)
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("problem", ["shape", "missing", "unexpected", "int_dtype"])
def test_no_tensor_data_read_when_anything_is_wrong(sh_ckpt, data_reads, problem):
    shards = sorted(f for f in os.listdir(sh_ckpt) if f.endswith(".safetensors"))
    last = shards[-1]

    def fn(t):
        name = sorted(t)[-1]
        if problem == "shape":
            t[name] = torch.randn(3, 3)
        elif problem == "missing":
            del t[name]
        elif problem == "unexpected":
            t["model.layers.0.extra.weight"] = torch.randn(3)
        else:
            t[name] = t[name].to(torch.int32)
    _rewrite(sh_ckpt, fn, last)
    if problem == "unexpected":        # the index must say where it is, or that is the error
        idx = _load(sh_ckpt, "model.safetensors.index.json")
        idx["weight_map"]["model.layers.0.extra.weight"] = last
        _write(sh_ckpt, idx, "model.safetensors.index.json")
    with pytest.raises(ModelLoadError):
        load_model(sh_ckpt)
    assert data_reads == []


def test_sharded_checkpoint_reads_each_tensor_once(sharded, data_reads):
    m = load_model(sharded)
    assert len(data_reads) == len(set(data_reads)) > 0
    assert torch.isfinite(m.score(IDS)).all()


# ---- 4. memory estimate against the device's free memory ----------------------------------------

def test_max_seq_len_too_large_refused_quickly(good):
    t = time.perf_counter()
    msg = _config_error(good, max_seq_len=10 ** 12)
    assert time.perf_counter() - t < 5
    assert "max_seq_len" in msg and "available" in msg


@pytest.mark.parametrize("value", [True, 64.0, "64", [64], 0, -5])
def test_max_seq_len_wrong_type(good, value):
    assert "max_seq_len" in _config_error(good, max_seq_len=value)


def test_memory_estimate_matches_what_is_allocated(good):
    from wsd_engine import memory
    m = load_model(good, max_seq_len=100)
    est = memory.estimate(m.config, m.dtype, 100)
    assert est["kv_cache"] == m.cache.nbytes()
    assert est["rope_tables"] == m.cos.nbytes + m.sin.nbytes
    unique = {t.data_ptr(): t.nbytes for t in m.weights.values()}
    assert est["weights"] == sum(unique.values())


def test_available_memory_cpu():
    from wsd_engine import memory
    n = memory.available_bytes(torch.device("cpu"))
    assert isinstance(n, int) and n > 0


def test_available_memory_cpu_without_proc_meminfo(monkeypatch):
    from wsd_engine import memory

    def no_file(*a, **k):
        raise FileNotFoundError("/proc/meminfo")
    monkeypatch.setattr(memory, "open", no_file, raising=False)
    monkeypatch.setattr(os, "sysconf", {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}.get)
    assert memory.available_bytes(torch.device("cpu")) == 4096 * 1000


def test_available_memory_cuda_counts_torch_cache(monkeypatch):
    from wsd_engine import memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    assert memory.available_bytes(torch.device("cuda", 0)) == 7 << 30


def test_refused_when_the_device_memory_is_short(good, monkeypatch, data_reads):
    from wsd_engine import memory
    from wsd_engine.loading import build_model
    m = load_model(good, max_seq_len=64)
    data_reads.clear()
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100_000)
    msg = _config_error(good, max_seq_len=64)
    assert "available" in msg and "max_seq_len" in msg and "dtype" in msg
    assert data_reads == []           # refused before any tensor data was read
    with pytest.raises(ConfigError, match="available"):
        build_model(m.config, m.weights, m.device, m.dtype, 4096)


# ---- 5. files outside the folder ---------------------------------------------------------------

@pytest.fixture
def opened(monkeypatch):
    """Every path passed to builtins.open and safetensors.safe_open, resolved."""
    import safetensors
    seen, real_open, real_safe_open = [], builtins.open, safetensors.safe_open

    def spy_open(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real_open(file, *a, **k)

    def spy_safe_open(file, *a, **k):
        seen.append(os.path.realpath(file))
        return real_safe_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(safetensors, "safe_open", spy_safe_open)
    if hasattr(wsd_engine.loader, "safe_open"):
        monkeypatch.setattr(wsd_engine.loader, "safe_open", spy_safe_open)
    return seen


@pytest.fixture
def outside(tmp_path, sharded, good):
    """A folder next to the checkpoint holding valid files that would load if reached."""
    d = tmp_path / "outside"
    d.mkdir()
    for f in os.listdir(sharded):
        if f.endswith(".safetensors"):
            shutil.copy(os.path.join(sharded, f), d / f)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(good, f), d / f)
    return str(d)


def _refused_unopened(folder, cls, match, seen, outside):
    """load_model(folder) raises cls and opens no file under `outside`."""
    seen.clear()               # forget the test's own setup
    with pytest.raises(cls, match=match):
        load_model(folder)
    root = os.path.realpath(outside)
    bad = [p for p in seen if p == root or p.startswith(root + os.sep)]
    assert not bad, f"opened outside the checkpoint folder: {bad}"


def _point_shard(ckpt, name_for):
    """Re-point the index's entries of the first shard to name_for(shard) and delete it."""
    idx = _load(ckpt, "model.safetensors.index.json")
    shard = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"] = {k: (name_for(shard) if v == shard else v)
                         for k, v in idx["weight_map"].items()}
    _write(ckpt, idx, "model.safetensors.index.json")
    os.remove(os.path.join(ckpt, shard))
    return shard


@pytest.mark.parametrize("how", ["dotdot", "absolute", "subdir", "dot_prefix", "nested_dotdot"])
def test_shard_name_outside_folder_refused(sh_ckpt, outside, opened, how):
    names = {"dotdot": lambda s: f"../outside/{s}",
             "absolute": lambda s: os.path.join(outside, s),
             "subdir": lambda s: f"sub/{s}",
             "dot_prefix": lambda s: f"./{s}",
             "nested_dotdot": lambda s: f"x/../../outside/{s}"}
    if how == "subdir":
        os.mkdir(os.path.join(sh_ckpt, "sub"))
    shard = _point_shard(sh_ckpt, names[how])
    if how == "subdir":
        shutil.copy(os.path.join(outside, shard), os.path.join(sh_ckpt, "sub", shard))
    _refused_unopened(sh_ckpt, ModelLoadError, "shard", opened, outside)


def test_shard_symlink_outside_refused(sh_ckpt, outside, opened):
    idx = _load(sh_ckpt, "model.safetensors.index.json")
    shard = sorted(set(idx["weight_map"].values()))[0]
    os.remove(os.path.join(sh_ckpt, shard))
    os.symlink(os.path.join(outside, shard), os.path.join(sh_ckpt, shard))
    _refused_unopened(sh_ckpt, ModelLoadError, "outside", opened, outside)


def test_shard_symlink_inside_is_fine(sh_ckpt, sharded):
    idx = _load(sh_ckpt, "model.safetensors.index.json")
    shard = sorted(set(idx["weight_map"].values()))[0]
    os.rename(os.path.join(sh_ckpt, shard), os.path.join(sh_ckpt, "real-" + shard))
    os.symlink("real-" + shard, os.path.join(sh_ckpt, shard))
    assert torch.equal(load_model(sh_ckpt).score(IDS), load_model(sharded).score(IDS))


def test_checkpoint_folder_may_be_a_symlink(good, tmp_path, ref):
    link = tmp_path / "link"
    os.symlink(good, link)
    assert torch.equal(load_model(str(link)).score(IDS), ref)


def test_hub_cache_snapshot_loads(good, tmp_path, outside, ref):
    """The Hugging Face hub cache links every file of <repo>/snapshots/<rev>/ to
    <repo>/blobs/<hash>: those links are followed, a link anywhere else is not."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(good))):
        shutil.copy(os.path.join(good, f), blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / f)
    assert torch.equal(load_model(str(snap)).score(IDS), ref)
    os.remove(snap / "model.safetensors")
    os.symlink(os.path.join(outside, "model.safetensors"), snap / "model.safetensors")
    with pytest.raises(ModelLoadError, match="outside"):
        load_model(str(snap))


@pytest.mark.parametrize("name,cls", [("config.json", ConfigError),
                                      ("generation_config.json", ConfigError),
                                      ("model.safetensors", ModelLoadError)])
def test_file_symlink_outside_refused(ckpt, outside, opened, name, cls):
    os.remove(os.path.join(ckpt, name))
    os.symlink(os.path.join(outside, name), os.path.join(ckpt, name))
    _refused_unopened(ckpt, cls, "outside", opened, outside)


def test_index_symlink_outside_refused(sh_ckpt, outside, opened):
    index = "model.safetensors.index.json"
    shutil.copy(os.path.join(sh_ckpt, index), os.path.join(outside, index))
    os.remove(os.path.join(sh_ckpt, index))
    os.symlink(os.path.join(outside, index), os.path.join(sh_ckpt, index))
    _refused_unopened(sh_ckpt, ModelLoadError, "outside", opened, outside)


def test_lone_safetensors_file_symlink_outside_refused(ckpt, outside, opened):
    os.remove(os.path.join(ckpt, "model.safetensors"))
    os.symlink(os.path.join(outside, "model.safetensors"), os.path.join(ckpt, "w.safetensors"))
    _refused_unopened(ckpt, ModelLoadError, "outside", opened, outside)


@pytest.mark.parametrize("weight_map", [[["model.norm.weight", "a.safetensors"]], "a.safetensors",
                                        None, 5, {"model.norm.weight": 5},
                                        {"model.norm.weight": ["a.safetensors"]},
                                        {"model.norm.weight": None},
                                        {"model.norm.weight": {"a": 1}}])
def test_index_weight_map_malformed(sh_ckpt, weight_map):
    idx = _load(sh_ckpt, "model.safetensors.index.json")
    idx["weight_map"] = weight_map
    _write(sh_ckpt, idx, "model.safetensors.index.json")
    with pytest.raises(ModelLoadError, match="weight_map") as e:
        load_model(sh_ckpt)
    assert len(str(e.value)) < MAX_MESSAGE


def test_index_tensor_name_not_a_string(sh_ckpt, monkeypatch):
    # JSON object keys are always strings; a weight_map from elsewhere may not be
    monkeypatch.setattr(wsd_engine.loader, "read_json",
                        lambda path, error_cls: {"weight_map": {7: "a.safetensors"}})
    with pytest.raises(ModelLoadError, match="weight_map maps 7"):
        load_model(sh_ckpt)


@pytest.mark.parametrize("raw", ["[1, 2]", '"x"', "null", "[" * 100_000 + "]" * 100_000,
                                 '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_index_not_an_object(sh_ckpt, raw):
    with open(os.path.join(sh_ckpt, "model.safetensors.index.json"), "w") as f:
        f.write(raw)
    with pytest.raises(ModelLoadError, match="index"):
        load_model(sh_ckpt)


def test_paths_inside(tmp_path):
    from wsd_engine.paths import inside
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.json").write_text("{}")
    (tmp_path / "secret").write_text("x")
    os.symlink("a.json", root / "link_in")
    (root / "sub").mkdir()
    (root / "sub" / "b.json").write_text("{}")
    os.symlink("sub/b.json", root / "link_sub")
    os.symlink(tmp_path / "secret", root / "link_out")
    os.symlink(tmp_path, root / "dir_out")
    os.symlink(".", root / "link_root")
    assert inside(str(root), "a.json", ConfigError) == os.path.realpath(root / "a.json")
    assert inside(str(root), "link_in", ConfigError) == os.path.realpath(root / "a.json")
    assert inside(root, "link_sub", ConfigError) == os.path.realpath(root / "sub" / "b.json")
    assert inside(str(root), "missing.json", ConfigError) == os.path.realpath(root / "missing.json")
    for bad in ["../secret", str(tmp_path / "secret"), "dir_out/secret", "link_out", "..", ".",
                "", "a\0b", "sub/b.json", "sub\\b.json", "link_root", 5, 10 ** 5000, None,
                ["a.json"]]:
        with pytest.raises(ModelLoadError):
            inside(str(root), bad, ModelLoadError)


# ---- 6. hostile safetensors headers ------------------------------------------------------------

def _split(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _put(path, header=None, body=b"", raw=None, length=None):
    text = raw if raw is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if length is None else length) + text + body)


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _edit_entry(field, value):
    def edit(header):
        header[_first_tensor(header)][field] = value
    return edit


def _rename_first(header):
    header["x" * 1_000_000] = header.pop(_first_tensor(header))


def _unreadable_dtype(header):
    """A valid safetensors file with a dtype torch cannot read: F4 (half a byte), the
    same bytes as the F32 tensor it replaces."""
    entry = header[_first_tensor(header)]
    entry["dtype"], entry["shape"] = "F4", [entry["shape"][0], entry["shape"][1] * 8]


def _many_dims(header):
    entry = header[_first_tensor(header)]
    entry["shape"] = [1] * 100_000 + entry["shape"]


# case -> (header edit, raw header bytes, length field), body kept
_HOSTILE_HEADERS = {
    "huge_length": (None, None, 2 ** 63),
    "length_past_end": (None, None, 10 ** 7),
    "not_json": (None, b"{not json at all        ", None),
    "json_list": (None, b"[1, 2, 3]", None),
    "unknown_dtype": (_edit_entry("dtype", "Q7"), None, None),
    "huge_dtype_string": (_edit_entry("dtype", "Q" * 1_000_000), None, None),
    "negative_shape": (_edit_entry("shape", [-1, 64]), None, None),
    "shape_not_list": (_edit_entry("shape", "abc"), None, None),
    "huge_shape": (_edit_entry("shape", [2 ** 62, 2 ** 62]), None, None),
    "offsets_past_end": (_edit_entry("data_offsets", [0, 10 ** 12]), None, None),
    "offsets_not_list": (_edit_entry("data_offsets", {"a": 1}), None, None),
    "torch_unreadable_dtype": (_unreadable_dtype, None, None),
    "huge_tensor_name": (_rename_first, None, None),
    "many_dims": (_many_dims, None, None),
}


@pytest.mark.parametrize("case", list(_HOSTILE_HEADERS) + ["empty_file"])
def test_hostile_header(ckpt, case):
    f = os.path.join(ckpt, "model.safetensors")
    header, body = _split(f)
    if case == "empty_file":
        open(f, "wb").close()
    else:
        edit, raw, length = _HOSTILE_HEADERS[case]
        if edit is not None:
            edit(header)
        _put(f, header, body, raw=raw, length=length)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors|does not match") as e:
        load_model(ckpt)
    assert len(str(e.value)) < 2 * MAX_MESSAGE, str(e.value)[:3000]


@pytest.fixture(scope="module")
def header_ckpt(good, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("hdr") / "m")
    shutil.copytree(good, dst)
    return dst


_HEADER_VALUES = st.one_of(
    _JSON, st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "F8_E4M3", "BOOL", "Q7"]),
    st.integers(min_value=-2, max_value=100_000), st.lists(st.integers(0, 1000), max_size=3))


@HYPOTHESIS
@given(data=st.data())
def test_garbled_header(good, header_ckpt, data):
    from safetensors.torch import load_file
    header, body = _split(os.path.join(good, "model.safetensors"))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        # walk down from the top to a random place, then delete, replace or rename there
        node = header
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = data.draw(st.sampled_from(keys), label="key")
            child = node[k]
            if not isinstance(child, (dict, list)) or data.draw(st.booleans(), label="stop"):
                break
            node = child
        if not keys:
            continue
        op = data.draw(st.sampled_from(["delete", "replace", "rename"]), label="op")
        if op == "delete":
            del node[k]
        elif op == "replace":
            node[k] = data.draw(_HEADER_VALUES, label="value")
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=30), label="name")] = node.pop(k)
    f = os.path.join(header_ckpt, "model.safetensors")
    _put(f, header, body)
    try:
        _finite_load(header_ckpt)
    except ModelLoadError as e:
        event("ModelLoadError")
        assert len(str(e)) < 2 * MAX_MESSAGE
    else:
        event("loaded")
        load_file(f)          # loaded: then the file really is a valid safetensors file


# ---- 7. still usable afterwards; 8. no reference to documents that are not here -------------

def test_engine_usable_after_hostile_loads(good, ref, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    for key, raw in [("num_hidden_layers", "1000000000"), ("rms_norm_eps", "NaN"),
                     ("eos_token_id", "[" * 100_000 + "]" * 100_000), ("head_dim", "32768")]:
        _set(bad, key, raw=raw)
        with pytest.raises(ConfigError):
            load_model(bad)
        shutil.copy(os.path.join(good, "config.json"), bad)
    with pytest.raises(ConfigError):
        load_model(good, max_seq_len=10 ** 12)
    _put(os.path.join(bad, "model.safetensors"), raw=b"[1]")
    with pytest.raises(ModelLoadError):
        load_model(bad)
    assert torch.equal(load_model(good).score(IDS), ref)


def test_no_reference_to_documents_not_in_the_repository():
    import re
    root = os.path.dirname(os.path.dirname(wsd_engine.__file__))
    for mod in ("config", "loader", "paths", "memory"):
        path = os.path.join(os.path.dirname(wsd_engine.__file__), mod + ".py")
        if not os.path.exists(path):
            continue
        for doc in re.findall(r"\b([A-Z][A-Z_]+)(?:\.md)? §", open(path).read()):
            assert os.path.exists(os.path.join(root, doc + ".md")), f"{mod}.py cites {doc} §"
