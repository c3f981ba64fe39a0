"""ModelConfig: the shape and numerics of a Llama / Qwen2 / Mistral checkpoint, read from
`config.json` (+ `generation_config.json` for EOS ids) and validated once."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from .errors import ConfigError, UnsupportedModelError

# architecture name -> family; one forward serves all three (they differ only by options).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    """torch.dtype or one of 'float32' / 'bfloat16' / 'float16' (and short forms)."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ConfigError(f"unsupported dtype {dtype!r}: use torch.float32, torch.bfloat16 or "
                      "torch.float16 (or 'float32' / 'bfloat16' / 'float16')")


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ConfigError(f"eos_token_id must be an int or a list of ints, got {value!r}")


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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config.json: num_attention_heads ({self.num_heads}) must be a "
                              f"multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"config.json: hidden_act {self.hidden_act!r} is not "
                                        "supported; only 'silu' (SwiGLU MLP) is")
        if self.rope.type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"config.json: rope_scaling type {self.rope.type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)} (or no rope_scaling)")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"config.json: rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check_context(self, max_seq_len: int) -> None:
        """Refuse a cache longer than what this forward computes exactly."""
        if self.sliding_window is not None and max_seq_len > self.sliding_window:
            raise UnsupportedModelError(
                f"this checkpoint uses sliding-window attention (window {self.sliding_window}); "
                f"the engine computes it exactly only while the window covers the whole context: "
                f"pass max_seq_len <= {self.sliding_window} (got {max_seq_len})")

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            mt = cfg.get("model_type")
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            if not archs and mt in by_type:
                arch = by_type[mt]
            else:
                raise UnsupportedModelError(
                    f"architecture {archs or mt!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]

        def req(key):
            if key not in cfg:
                raise ConfigError(f"config.json has no {key!r}; it is required for {arch}")
            return cfg[key]

        hidden = req("hidden_size")
        heads = req("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and
                                           isinstance(heads, int) and heads else 0)

        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions
        # write `rope_theta` and `rope_scaling` at the top level. Read both.
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        scaling = dict(rp) if isinstance(rp, dict) else dict(cfg.get("rope_scaling") or {})
        theta = float(scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rtype = scaling.get("rope_type", scaling.get("type", "default")) or "default"
        rope = RopeConfig(theta=theta, type=rtype)
        if rtype in ("linear", "llama3"):
            if "factor" not in scaling:
                raise ConfigError(f"config.json: rope_scaling {rtype!r} needs a 'factor'")
            rope.factor = float(scaling["factor"])
        if rtype == "llama3":
            try:
                rope.low_freq_factor = float(scaling["low_freq_factor"])
                rope.high_freq_factor = float(scaling["high_freq_factor"])
                rope.original_max_position_embeddings = int(
                    scaling["original_max_position_embeddings"])
            except KeyError as e:
                raise ConfigError(f"config.json: rope_scaling 'llama3' needs {e.args[0]!r}") from None

        sliding = None
        if family == "mistral":
            sliding = cfg.get("sliding_window")
        elif family == "qwen2" and cfg.get("use_sliding_window"):
            sliding = cfg.get("sliding_window")

        eos = _eos_list(cfg.get("eos_token_id"))
        if generation_config:
            for e in _eos_list(generation_config.get("eos_token_id")):
                if e not in eos:
                    eos.append(e)
        bos = cfg.get("bos_token_id")
        if bos is None and generation_config:
            bos = generation_config.get("bos_token_id")

        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch, family=family,
            vocab_size=req("vocab_size"), hidden_size=hidden,
            intermediate_size=req("intermediate_size"), num_layers=req("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding, bos_token_id=bos, eos_token_ids=eos,
            dtype=parse_dtype(dtype_name), hidden_act=cfg.get("hidden_act", "silu"),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ConfigError(f"checkpoint folder {path!r} does not exist (or is not a folder); "
                              "pass the folder that holds config.json and the *.safetensors files")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{path!r} has no config.json; a Hugging Face checkpoint folder "
                              "(config.json + *.safetensors) is expected")
        cfg = _read_json(cfg_path)
        gen_path = os.path.join(path, "generation_config.json")
        gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
        return cls.from_dict(cfg, gen)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


# Real model shapes (for benchmarks with random weights; DESIGN §5).
PRESETS = {
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        tie_word_embeddings=True),
    "llama3.2-3b": dict(architectures=["LlamaForCausalLM"], hidden_size=3072,
                        intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        tie_word_embeddings=True),
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        tie_word_embeddings=False),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0, max_position_embeddings=32768),
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
    d.update(PRESETS[name])
    return ModelConfig.from_dict(d)
