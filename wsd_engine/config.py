"""ModelConfig: the shape and numerics of a Llama / Qwen2 / Mistral checkpoint, read from
`config.json` (+ `generation_config.json` for BOS / EOS ids) and validated once.

A checkpoint folder is untrusted input. Every value is read through a typed reader
(`_Reader.int / float / bool / str / strings / token_ids / obj`) that checks its JSON type
and range and raises ConfigError naming the file, the key, a short description of the value
and what was expected. Sizes are bounded (`LIMITS`), so nothing built from them (per-layer
tables, the KV cache, RoPE tables) can be absurdly large, and the RoPE and RMSNorm numbers
are checked so that no accepted config computes NaN.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import reprlib
from dataclasses import dataclass, field

import torch

from .errors import ConfigError, UnsupportedModelError
from .paths import inside

# architecture name -> family; one forward serves them all (they differ only by options;
# Gemma-2's layer has two more norms, see model.py).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma2ForCausalLM": "gemma2",
}
# the MLP activation each family may use (config.json hidden_act / hidden_activation)
_ACTIVATIONS = {"llama": ("silu",), "mistral": ("silu",), "qwen2": ("silu",),
                "gemma2": ("gelu_pytorch_tanh",)}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# config.json key -> (smallest, largest) integer accepted. The upper bounds are beyond every
# released model of these families and keep everything built per layer, head or position
# bounded; a larger value is a typo or a hostile file (UnsupportedModelError).
_POSITIONS = (1, 2 ** 40 - 1)
_TOKEN_IDS = (0, 2 ** 31 - 1)
LIMITS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 65536),
    "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 512),        # the attention kernels' largest head (and even, for RoPE)
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": _POSITIONS,
    "sliding_window": _POSITIONS,
    "sliding_window_size": _POSITIONS,
    "original_max_position_embeddings": _POSITIONS,
    "bos_token_id": _TOKEN_IDS,
    "eos_token_id": _TOKEN_IDS,
}
# finite float ranges: the RoPE base (10000 to 1e6 in practice; below 1 the frequencies
# grow past fp32), and the RoPE scaling factors (a ratio: 0 divides by zero)
_THETA = (1.0, 1e30)
_FACTOR = (1e-6, 1e6)
# ModelConfig field -> its config.json key, for messages
_FIELD_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
               "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
               "head_dim": "head_dim", "max_position_embeddings": "max_position_embeddings"}
# config / index files are kilobytes: refuse a huge one before parsing it
MAX_JSON_BYTES = 16 << 20           # an index of 65,536 tensors is ~5 MB
# and few JSON objects / arrays (an index is one object; a config has tens): counted on the
# raw text before parsing, so "{}" repeated millions of times (1.4 GB once parsed) is refused
MAX_JSON_CONTAINERS = 100_000
MAX_TOKEN_IDS = 1024                # eos ids of one file (real ones list 1 to 3)


def parse_dtype(dtype) -> torch.dtype:
    """torch.dtype or one of 'float32' / 'bfloat16' / 'float16' (and short forms)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ConfigError(f"unsupported dtype {describe(dtype)}: use torch.float32, torch.bfloat16 "
                      "or torch.float16 (or 'float32' / 'bfloat16' / 'float16')")


def describe_arg(value) -> str:
    """`describe` in Python's spelling (None, True), for arguments of the Python API."""
    if value is None or isinstance(value, bool):
        return repr(value)
    return describe(value)


def describe(value, depth: int = 2) -> str:
    """A short JSON-like rendering of a (config) value for an error message.

    Bounded in length and depth whatever the value: a hostile file can hold a megabyte
    string, a million-item list, a 4000-digit integer (whose str() raises) or nesting a
    thousand levels deep. Strings keep 40 characters, containers 4 items, 2 levels.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) < 10 ** 18:
            return str(value)
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'minus ' if value < 0 else ''}a {digits}-digit integer"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "-Infinity" if value < 0 else "Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value[:40]) + (f"… ({len(value)} characters)" if len(value) > 40 else "")
    if isinstance(value, (list, tuple)):
        if depth == 0:
            return f"[…{len(value)} items]" if value else "[]"
        items = [describe(v, depth - 1) for v in itertools.islice(value, 4)]
        return "[" + ", ".join(items) + (f", … ({len(value)} items)]" if len(value) > 4 else "]")
    if isinstance(value, dict):
        if depth == 0:
            return f"{{…{len(value)} keys}}" if value else "{}"
        items = [f"{describe(k, 0)}: {describe(v, depth - 1)}"
                 for k, v in itertools.islice(value.items(), 4)]
        return "{" + ", ".join(items) + (f", … ({len(value)} keys)}}" if len(value) > 4 else "}")
    return reprlib.repr(value)     # not from JSON: an argument (e.g. a torch.dtype)


_REQUIRED = object()


class _Reader:
    """Typed access to one JSON object of a config file. Absent and null both mean "not
    set": the default, or an error when the key is required. Every error names the file
    and the key (`config.json: rope_parameters.factor`)."""

    def __init__(self, data: dict, file: str, prefix: str = ""):
        self.data, self.file, self.prefix = data, file, prefix

    def name(self, key: str) -> str:
        return f"{self.file}: {self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default=_REQUIRED):
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.name(key)} is missing (or null); it is required: use "
                                  "the config.json the model was published with")
            return default
        return value

    def int(self, key: str, default=_REQUIRED) -> int | None:
        """An integer within LIMITS[key]."""
        value = self.get(key, default)
        return None if value is None else check_int(value, self.name(key), *LIMITS[key])

    def float(self, key: str, default, lo: float, hi: float, open_interval: bool = False):
        """A finite number in [lo, hi] ((lo, hi) with open_interval), as a float."""
        value = self.get(key, default)
        if value is None:
            return None
        x = _as_float(value)
        if x is None or not ((lo < x < hi) if open_interval else (lo <= x <= hi)):
            interval = f"({lo:g}, {hi:g})" if open_interval else f"[{lo:g}, {hi:g}]"
            raise ConfigError(f"{self.name(key)} must be a finite number in {interval}, got "
                              f"{describe(value)}")
        return x

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.name(key)} must be true or false, got {describe(value)}")
        return value

    def str(self, key: str, default=_REQUIRED) -> str | None:
        value = self.get(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.name(key)} must be a string, got {describe(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.name(key)} must be a list of strings, got "
                              f"{describe(value)}")
        return value

    def token_ids(self, key: str) -> list[int]:
        """An integer or a list of integers (token ids); [] when not set."""
        value = self.get(key, [])
        ids = value if isinstance(value, list) else [value]
        if len(ids) > MAX_TOKEN_IDS:
            raise ConfigError(f"{self.name(key)} lists {len(ids)} token ids; at most "
                              f"{MAX_TOKEN_IDS} are accepted")
        lo, hi = LIMITS[key]
        if not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
                   for v in ids):
            raise ConfigError(f"{self.name(key)} must be an integer or a list of integers in "
                              f"[{lo}, {hi}] (token ids), got {describe(value)}")
        return list(ids)

    def obj(self, key: str) -> "_Reader | None":
        """A nested JSON object (None when not set)."""
        value = self.get(key, None)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{self.name(key)} must be a JSON object (or null), got "
                              f"{describe(value)}")
        return _Reader(value, self.file, f"{self.prefix}{key}.")


def check_int(value, name: str, lo: int, hi: int) -> int:
    """value if it is an int (not a bool) in [lo, hi]; ConfigError otherwise, and
    UnsupportedModelError when it is only too large."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {describe(value)}")
    if value > hi:
        raise UnsupportedModelError(
            f"{name} must be an integer in [{lo}, {hi}] ({hi} is the largest the engine "
            f"supports), got {describe(value)}; check the checkpoint's config.json")
    if value < lo:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {describe(value)}")
    return value


def _as_float(value) -> float | None:
    """A JSON number as a float (None: not a number, or infinite / NaN / beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:      # an integer beyond the float range
        return None
    return x if math.isfinite(x) else None


@dataclass(slots=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"               # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0        # llama3 only
    high_freq_factor: float = 4.0       # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim // 2] fp32 inverse frequencies, scaled as Hugging Face does."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64)
                                    .to(torch.float32) / head_dim))
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            # Frequencies with wavelengths longer than original_max / low_freq_factor are
            # divided by `factor`, shorter than original_max / high_freq_factor kept, and
            # the band between is interpolated smoothly (Llama 3.1 "rope_type": "llama3").
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = ((self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor))
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    family: str                         # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False              # Qwen2 always; Llama with attention_bias
    o_bias: bool = False                # Llama with attention_bias
    mlp_bias: bool = False              # Llama mlp_bias
    sliding_window: int | None = None   # Mistral / Qwen2 use_sliding_window
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # the checkpoint's dtype
    hidden_act: str = "silu"
    # Gemma-2 (None / () elsewhere): embeddings x sqrt(hidden_size) in the model dtype; the
    # attention scale query_pre_attn_scalar ** -0.5; tanh soft-caps of the attention scores
    # and of the final logits; a window per layer (None: full attention)
    embed_scale: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_windows: tuple = ()

    def __post_init__(self):
        for name, key in _FIELD_KEYS.items():
            check_int(getattr(self, name), f"config.json: {key}", *LIMITS[key])
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config.json: num_attention_heads ({self.num_heads}) must be a "
                              f"multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        acts = _ACTIVATIONS[self.family]
        if self.hidden_act not in acts:
            raise UnsupportedModelError(
                f"config.json: hidden_act {describe(self.hidden_act)} is not supported for "
                f"{self.architecture}; only {', '.join(map(repr, acts))} is")
        if self.rope.type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"config.json: rope_scaling type {describe(self.rope.type)} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)} (or no rope_scaling)")
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"config.json: rms_norm_eps must be in (0, 1), got "
                              f"{describe(self.rms_norm_eps)}")
        # the readers bound each RoPE number; this catches any combination of them that
        # still overflows fp32 (the forward would return NaN logits, silently)
        if not bool(torch.isfinite(self.rope.inv_freq(self.head_dim)).all()):
            raise ConfigError(f"config.json: the RoPE settings {self.rope} give non-finite "
                              "frequencies; check rope_theta and the rope scaling factors")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_gemma2(self) -> bool:
        return self.family == "gemma2"

    def check_context(self, max_seq_len: int) -> None:
        """Refuse a cache longer than what this forward computes exactly."""
        if self.is_gemma2 and max_seq_len > self.max_position_embeddings:
            raise UnsupportedModelError(
                f"Gemma-2 was trained for {self.max_position_embeddings} positions "
                f"(max_position_embeddings); pass max_seq_len <= {self.max_position_embeddings} "
                f"(got {max_seq_len})")
        if self.sliding_window is not None and max_seq_len > self.sliding_window:
            raise UnsupportedModelError(
                f"this checkpoint uses sliding-window attention (window {self.sliding_window}); "
                f"the engine computes it exactly only while the window covers the whole context: "
                f"pass max_seq_len <= {self.sliding_window} (got {max_seq_len})")

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "ModelConfig":
        c = _Reader(cfg, "config.json")
        gen = _Reader(generation_config or {}, "generation_config.json")
        arch = _architecture(c)
        family = SUPPORTED_ARCHITECTURES[arch]
        hidden, heads = c.int("hidden_size"), c.int("num_attention_heads")
        head_dim = c.int("head_dim", None)

        sliding = None
        if family == "mistral" or (family == "qwen2" and c.bool("use_sliding_window", False)):
            sliding = c.int("sliding_window", None)

        eos = c.token_ids("eos_token_id")
        seen = set(eos)
        for e in gen.token_ids("eos_token_id"):
            if e not in seen:
                seen.add(e)
                eos.append(e)
        bos, gen_bos = c.int("bos_token_id", None), gen.int("bos_token_id", None)

        attention_bias = c.bool("attention_bias", False)
        gemma = _gemma2_options(c, heads) if family == "gemma2" else {}
        return cls(**{**dict(
            architecture=arch, family=family,
            vocab_size=c.int("vocab_size"), hidden_size=hidden,
            intermediate_size=c.int("intermediate_size"), num_layers=c.int("num_hidden_layers"),
            num_heads=heads, num_kv_heads=c.int("num_key_value_heads", heads),
            head_dim=hidden // heads if head_dim is None else head_dim,
            rms_norm_eps=c.float("rms_norm_eps", 1e-6, 0.0, 1.0, open_interval=True),
            rope=_rope(c),
            max_position_embeddings=c.int("max_position_embeddings", 2048),
            tie_word_embeddings=c.bool("tie_word_embeddings", False),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=c.bool("mlp_bias", False),
            sliding_window=sliding, bos_token_id=gen_bos if bos is None else bos,
            eos_token_ids=eos, dtype=_checkpoint_dtype(c),
            hidden_act=c.str("hidden_act", "silu"),
        ), **gemma})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ConfigError(f"checkpoint folder {path!r} does not exist (or is not a folder); "
                              "pass the folder that holds config.json and the *.safetensors files")
        cfg_path = inside(path, "config.json", ConfigError)
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{path!r} has no config.json; a Hugging Face checkpoint folder "
                              "(config.json + *.safetensors) is expected")
        cfg = read_json(cfg_path, ConfigError)
        gen_path = inside(path, "generation_config.json", ConfigError)
        gen = read_json(gen_path, ConfigError) if os.path.isfile(gen_path) else None
        return cls.from_dict(cfg, gen)


def _softcap(c: "_Reader", key: str, default: float) -> float | None:
    """A soft-cap: absent -> Gemma-2's default, null -> none, else a positive number."""
    if key in c.data and c.data[key] is None:
        return None
    return c.float(key, default, 0.0, 1e6, open_interval=True)


def _gemma2_options(c: "_Reader", heads: int) -> dict:
    """Gemma-2's options. The published configs have no `layer_types` (sliding and full
    attention alternate, layer 0 sliding) and may spell the window `sliding_window_size`;
    newer ones list `layer_types`. The activation is `hidden_activation` (or `hidden_act`)."""
    n_layers = c.int("num_hidden_layers")
    window = c.int("sliding_window", None)
    if window is None:
        window = c.int("sliding_window_size", 4096)
    types = c.strings("layer_types") if c.has("layer_types") else \
        ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or any(t not in ("sliding_attention", "full_attention")
                                     for t in types):
        raise ConfigError(f"config.json: layer_types must list 'sliding_attention' or "
                          f"'full_attention' for each of the {n_layers} layers, got "
                          f"{describe(types)}")
    hidden = c.int("hidden_size")
    act = c.str("hidden_activation", None) or c.str("hidden_act", "gelu_pytorch_tanh")
    return dict(
        embed_scale=hidden ** 0.5,
        attn_scale=c.float("query_pre_attn_scalar", 256.0, 0.0, 1e9, open_interval=True) ** -0.5,
        attn_softcap=_softcap(c, "attn_logit_softcapping", 50.0),
        final_softcap=_softcap(c, "final_logit_softcapping", 30.0),
        layer_windows=tuple(window if t == "sliding_attention" else None for t in types),
        hidden_act=act,
        tie_word_embeddings=c.bool("tie_word_embeddings", True),
    )


def _architecture(c: _Reader) -> str:
    archs, model_type = c.strings("architectures"), c.str("model_type", None)
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        if archs or model_type not in by_type:
            raise UnsupportedModelError(
                f"architecture {describe(archs or model_type)} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        arch = by_type[model_type]
    return arch


def _rope(c: _Reader) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside; per attention type
    # under "full_attention" in some models); older versions write `rope_theta` and
    # `rope_scaling` at the top level. Read both.
    new, old = c.obj("rope_parameters"), c.obj("rope_scaling")
    params = new if new is not None else old
    if params is not None and params.has("full_attention"):
        params = params.obj("full_attention")
    if params is None:
        return RopeConfig(theta=c.float("rope_theta", 10000.0, *_THETA))
    theta = params.float("rope_theta", None, *_THETA)
    rope = RopeConfig(theta=c.float("rope_theta", 10000.0, *_THETA) if theta is None else theta,
                      type=params.str("rope_type", None) or params.str("type", None) or "default")
    if rope.type in ("linear", "llama3"):
        rope.factor = params.float("factor", _REQUIRED, *_FACTOR)
    if rope.type == "llama3":
        rope.low_freq_factor = params.float("low_freq_factor", _REQUIRED, *_FACTOR)
        rope.high_freq_factor = params.float("high_freq_factor", _REQUIRED, *_FACTOR)
        rope.original_max_position_embeddings = params.int("original_max_position_embeddings")
        if rope.low_freq_factor == rope.high_freq_factor:    # the band between divides by 0
            raise ConfigError(f"{params.name('low_freq_factor')} and high_freq_factor are both "
                              f"{rope.low_freq_factor:g}; llama3 RoPE interpolates between "
                              "them, so they must differ (Llama 3.1: 1 and 4)")
    return rope


def _checkpoint_dtype(c: _Reader) -> torch.dtype:
    for key in ("dtype", "torch_dtype"):      # transformers >= 4.56 writes dtype
        name = c.str(key, None)
        if name:
            try:
                return parse_dtype(name)
            except ConfigError:
                raise ConfigError(f"{c.name(key)} must be 'float32', 'bfloat16' or 'float16' "
                                  f"(the weights' dtype), got {describe(name)}") from None
    return torch.float32


def read_json(path: str, error_cls: type[Exception] = ConfigError) -> dict:
    """The JSON object in file `path` (a config or an index); error_cls if the file is too
    large, unreadable, not JSON, nested too deeply for the parser or not an object."""
    try:
        size = os.path.getsize(path)
        if size <= MAX_JSON_BYTES:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            containers = text.count("{") + text.count("[")   # an upper bound (strings too)
            if containers > MAX_JSON_CONTAINERS:
                raise error_cls(f"{path} holds {containers:,} JSON objects or arrays (at most "
                                f"{MAX_JSON_CONTAINERS:,} accepted: a config or index has few); "
                                "the file is corrupt or hostile")
            data = json.loads(text)
    except (OSError, ValueError, RecursionError, MemoryError) as e:
        # ValueError: not JSON, not UTF-8, or an integer too long to parse
        raise error_cls(f"cannot read {path}: {str(e)[:200]}; the file is corrupt (valid "
                        "JSON is expected): re-download it") from e
    if size > MAX_JSON_BYTES:
        raise error_cls(f"{path} is {size} bytes; a config or index file is kilobytes (at most "
                        f"{MAX_JSON_BYTES} accepted): the file is not what its name says")
    if not isinstance(data, dict):
        raise error_cls(f"{path} must hold a JSON object, not {describe(data)}")
    return data


# Real models' shapes, for benchmarks with random weights (`preset_config`).
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PRESETS = {
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        tie_word_embeddings=True),
    "llama3.2-3b": dict(architectures=["LlamaForCausalLM"], hidden_size=3072,
                        intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        tie_word_embeddings=True),
    # Llama-3.1 (8B, 70B): their published configs' rope factor 8, not the 3.2 models' 32
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        tie_word_embeddings=False, rope_scaling=_LLAMA31_ROPE),
    "llama3.1-70b": dict(architectures=["LlamaForCausalLM"], hidden_size=8192,
                         intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False, rope_scaling=_LLAMA31_ROPE),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0, max_position_embeddings=32768),
    # Gemma-2 (the published configs' fields: no layer_types, the window as both spellings)
    "gemma2-9b": dict(architectures=["Gemma2ForCausalLM"], hidden_size=3584,
                      intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                      vocab_size=256000, tie_word_embeddings=True),
    "gemma2-27b": dict(architectures=["Gemma2ForCausalLM"], hidden_size=4608,
                       intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
                       vocab_size=256000, tie_word_embeddings=True),
}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    d = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
             rope_scaling=_LLAMA3_ROPE, dtype="bfloat16", bos_token_id=128000,
             eos_token_id=[128001, 128008, 128009])
    if name.startswith("qwen"):
        d.update(rope_scaling=None, bos_token_id=None, eos_token_id=151643, rms_norm_eps=1e-6)
    if name.startswith("gemma2"):
        d.update(rope_scaling=None, rope_theta=10000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=[1, 107],
                 hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                 sliding_window=4096, sliding_window_size=4096, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, cache_implementation="hybrid")
    d.update(PRESETS[name])
    return ModelConfig.from_dict(d)
