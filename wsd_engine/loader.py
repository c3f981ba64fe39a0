"""Checkpoint loading: safetensors (single file or sharded index) -> tensors on the target
device and dtype, checked strictly against the config.

Only safetensors are read (memory-mapped through the `safetensors` library); pickle
checkpoints are refused, never unpickled. Shards are opened one at a time and closed before
the next, so peak host memory is about the loaded model plus one shard's mapped pages.
q/k/v are fused into one `qkv` matrix and gate/up into one `gate_up` matrix, so a layer
runs two fewer matmuls per step.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections import defaultdict

import torch

from .config import ModelConfig
from .errors import ModelLoadError

# Buffers some exporters save that carry no learned state; recomputed by the engine.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for this config."""
    d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d),
                                          "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_size, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_size, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.q_size)
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.kv_size,)
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (i, d)
        shapes[p + "mlp.up_proj.weight"] = (i, d)
        shapes[p + "mlp.down_proj.weight"] = (d, i)
        if cfg.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (i,)
            shapes[p + "mlp.up_proj.bias"] = (i,)
            shapes[p + "mlp.down_proj.bias"] = (d,)
    return shapes


def find_weight_files(path: str) -> dict[str, list[str]]:
    """Shard file -> tensor names it holds (from the index, or the single file's header)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index "
                                 f"(expected a JSON object with 'weight_map'): {e}") from e
        files: dict[str, list[str]] = defaultdict(list)
        for name, shard in weight_map.items():
            files[shard].append(name)
        missing = sorted(s for s in files if not os.path.isfile(os.path.join(path, s)))
        if missing:
            raise ModelLoadError(f"{index} names shard file(s) that are not in {path!r}: "
                                 f"{', '.join(missing)}; the checkpoint is incomplete, copy the "
                                 "missing shards")
        return dict(files)
    if os.path.isfile(single):
        return {"model.safetensors": None}  # names read from the header
    others = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(others) == 1:
        return {os.path.basename(others[0]): None}
    pickles = sorted(os.path.basename(p) for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                     for p in glob.glob(os.path.join(path, ext)))
    if pickles:
        raise ModelLoadError(
            f"{path!r} holds only pickle checkpoint files ({', '.join(pickles)}); the engine "
            "loads safetensors only and never unpickles. Convert once with transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)` in a trusted environment")
    if others:
        raise ModelLoadError(f"{path!r} holds several *.safetensors files but no "
                             "model.safetensors.index.json saying which tensor is where")
    raise ModelLoadError(f"{path!r} has no model.safetensors or model.safetensors.index.json")


def _open(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        raise ModelLoadError(f"cannot read {path}: {e}. The file is corrupt or truncated "
                             "(a safetensors header followed by the tensor data is expected); "
                             "re-download or re-save it") from e


def load_weights(path: str, cfg: ModelConfig, device: torch.device | str,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read every tensor, check names and shapes, cast and move, then fuse.

    Returns engine names: `embed`, `norm`, `lm_head` (the embedding when tied) and per
    layer `layers.{i}.{attn_norm, qkv, qkv_bias?, o, o_bias?, mlp_norm, gate_up,
    gate_up_bias?, down, down_bias?}`.
    """
    path = os.fspath(path)
    expected = expected_shapes(cfg)
    files = find_weight_files(path)
    raw: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    unexpected: list[str] = []
    for shard, names in files.items():
        fpath = os.path.join(path, shard)
        with _open(fpath) as f:
            keys = list(f.keys())
            if names is not None:
                absent = sorted(set(names) - set(keys))
                if absent:
                    problems.append(f"index says {shard} holds {', '.join(absent[:5])}"
                                    f"{' …' if len(absent) > 5 else ''} but it does not")
            for name in keys:
                if name not in expected:
                    if _IGNORED.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue
                    unexpected.append(name)
                    continue
                if name in raw:
                    problems.append(f"{name} appears in more than one shard")
                    continue
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != expected[name]:
                    problems.append(f"{name} has shape {shape}, config says {expected[name]}")
                    continue
                try:
                    t = f.get_tensor(name)
                except Exception as e:  # noqa: BLE001 - data region unreadable
                    raise ModelLoadError(f"cannot read tensor {name} from {fpath}: {e}; the "
                                         "file is truncated or corrupt") from e
                if not t.is_floating_point():
                    problems.append(f"{name} has dtype {t.dtype}; floating point expected")
                    continue
                raw[name] = t.to(device=device, dtype=dtype)
                del t
    missing = sorted(set(expected) - set(raw))
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:8])}"
                        f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensor(s) the config does not account for: "
                        f"{', '.join(sorted(unexpected)[:8])}"
                        f"{f' and {len(unexpected) - 8} more' if len(unexpected) > 8 else ''}")
    if problems:
        raise ModelLoadError(f"checkpoint {path!r} does not match its config.json "
                             f"({cfg.architecture}, {cfg.num_layers} layers, hidden "
                             f"{cfg.hidden_size}):\n  - " + "\n  - ".join(problems))
    return _fuse(raw, cfg)


def _fuse(raw: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    w: dict[str, torch.Tensor] = {"embed": raw.pop("model.embed_tokens.weight"),
                                  "norm": raw.pop("model.norm.weight")}
    w["lm_head"] = w["embed"] if cfg.tie_word_embeddings else raw.pop("lm_head.weight")
    for layer in range(cfg.num_layers):
        p, q = f"model.layers.{layer}.", f"layers.{layer}."
        a, m = p + "self_attn.", p + "mlp."
        w[q + "attn_norm"] = raw.pop(p + "input_layernorm.weight")
        w[q + "mlp_norm"] = raw.pop(p + "post_attention_layernorm.weight")
        w[q + "qkv"] = torch.cat([raw.pop(a + n + "_proj.weight") for n in "qkv"])  # [q+2kv, d]
        if cfg.qkv_bias:
            w[q + "qkv_bias"] = torch.cat([raw.pop(a + n + "_proj.bias") for n in "qkv"])
        w[q + "o"] = raw.pop(a + "o_proj.weight")                                  # [d, q]
        if cfg.o_bias:
            w[q + "o_bias"] = raw.pop(a + "o_proj.bias")
        w[q + "gate_up"] = torch.cat([raw.pop(m + "gate_proj.weight"),
                                      raw.pop(m + "up_proj.weight")])              # [2I, d]
        w[q + "down"] = raw.pop(m + "down_proj.weight")                            # [d, I]
        if cfg.mlp_bias:
            w[q + "gate_up_bias"] = torch.cat([raw.pop(m + "gate_proj.bias"),
                                               raw.pop(m + "up_proj.bias")])
            w[q + "down_bias"] = raw.pop(m + "down_proj.bias")
    assert not raw, sorted(raw)
    return w
