"""Checkpoint loading: safetensors (single file or sharded index) -> tensors on the target
device and dtype, checked strictly against the config.

Only safetensors are read (memory-mapped through the `safetensors` library); pickle
checkpoints are refused, never unpickled. The folder is untrusted, so loading has two
phases. Phase 1 reads only the headers of every shard (names, shapes, dtypes; the library
validates the rest of each header) and checks them against the config: the layer count
first, so a config that claims a million layers is refused before anything is built per
layer, then every name, shape and dtype, all problems listed in one ModelLoadError. Only a
checkpoint without a problem reaches phase 2, which reads the tensor data. Every file
opened is checked to lie inside the folder (`paths.inside`). Shards are read one at a time
and closed before the next, so peak host memory is about the loaded model plus one shard's
mapped pages. q/k/v are fused into one `qkv` matrix and gate/up into one `gate_up` matrix,
so a layer runs two fewer matmuls per step.
"""
from __future__ import annotations

import glob
import stat
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import safetensors
import torch

from .config import ModelConfig, describe, read_json
from .errors import ModelLoadError
from .paths import inside

INDEX = "model.safetensors.index.json"
# bounds on what a checkpoint's files may declare, far above any supported model (1,024
# layers of ~15 tensors; Llama-3.1-405B ships 191 shards), so a hostile header or index
# cannot make the loader parse millions of entries (1.6M names: 1.3 GB, 12 s)
MAX_TENSORS = 65536
MAX_SHARDS = 4096
MAX_HEADER_BYTES = 16 << 20          # ~250 bytes per tensor entry at most
# Buffers some exporters save that carry no learned state; recomputed by the engine.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
# a layer's tensor names start with this; more than 9 digits is no layer index (and int()
# of a 5000-digit string raises)
_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.")
# safetensors dtypes that are cast to the model dtype (torch reads them all)
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E4M3", "F8_E5M2")


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
        if cfg.is_gemma2:        # its post_attention_layernorm follows the attention
            shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
            shapes[p + "post_feedforward_layernorm.weight"] = (d,)
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


@dataclass(frozen=True, slots=True)
class Shard:
    name: str                   # file name in the checkpoint folder
    path: str                   # its real path, inside the folder
    names: list[str] | None     # the tensors the index puts in it (None: no index)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    shard: Shard
    shape: tuple[int, ...]
    dtype: str                  # safetensors dtype name: "F32", "BF16", ...


def find_weight_files(path: str) -> list[Shard]:
    """The weight files: the index's shards, or the single *.safetensors file."""
    index = inside(path, INDEX, ModelLoadError)
    if os.path.isfile(index):
        return _index_shards(path, index)
    single = inside(path, "model.safetensors", ModelLoadError)
    if os.path.isfile(single):
        return [Shard("model.safetensors", single, None)]   # names read from the header
    # regular files only: a FIFO named x.safetensors would block the open forever
    others = sorted(p for p in glob.glob(os.path.join(glob.escape(path), "*.safetensors"))
                    if _regular(p))
    if len(others) == 1:
        name = os.path.basename(others[0])
        return [Shard(name, inside(path, name, ModelLoadError), None)]
    pickles = sorted(os.path.basename(p) for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                     for p in glob.glob(os.path.join(glob.escape(path), ext)))
    if pickles:
        raise ModelLoadError(
            f"{path!r} holds only pickle checkpoint files ({', '.join(pickles)}); the engine "
            "loads safetensors only and never unpickles. Convert once with transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)` in a trusted environment")
    if others:
        raise ModelLoadError(f"{path!r} holds several *.safetensors files but no "
                             f"{INDEX} saying which tensor is where")
    raise ModelLoadError(f"{path!r} has no model.safetensors or {INDEX}")


def _index_shards(path: str, index: str) -> list[Shard]:
    weight_map = read_json(index, ModelLoadError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index}: weight_map must be a JSON object mapping tensor names to "
                             f"shard file names, got {describe(weight_map)}; the index is "
                             "corrupt: re-download it")
    if len(weight_map) > MAX_TENSORS:
        raise ModelLoadError(f"{index}: weight_map names {len(weight_map)} tensors, more than "
                             f"any supported model has (at most {MAX_TENSORS}); the index is "
                             "corrupt or hostile")
    names: dict[str, list[str]] = defaultdict(list)
    for tensor, shard in weight_map.items():
        if not isinstance(tensor, str) or not isinstance(shard, str):
            raise ModelLoadError(f"{index}: weight_map maps {describe(tensor)} to "
                                 f"{describe(shard)}; it must map tensor names to shard file "
                                 "names (strings): the index is corrupt, re-download it")
        names[shard].append(tensor)
    if len(names) > MAX_SHARDS:
        raise ModelLoadError(f"{index} names {len(names)} shard files, more than any real "
                             f"checkpoint (at most {MAX_SHARDS}); the index is corrupt or hostile")
    shards = [Shard(shard, _shard_path(path, index, shard), tensors)
              for shard, tensors in names.items()]
    missing = [s.name for s in shards if not _regular(s.path)]
    if missing:
        raise ModelLoadError(f"{index} names shard file(s) that are not in {path!r}: "
                             f"{_listing(sorted(missing))}; the checkpoint is incomplete, copy "
                             "the missing shards")
    return shards


def _shard_path(path: str, index: str, shard: str) -> str:
    try:
        return inside(path, shard, ModelLoadError)
    except ModelLoadError as e:
        raise ModelLoadError(f"{index} names a shard file that cannot be read: {e}") from None


def read_headers(shards: list[Shard]) -> tuple[dict[str, TensorInfo], list[str]]:
    """Phase 1: each tensor's shard, shape and dtype, from the shard headers alone, and the
    problems seen on the way (the index disagreeing with a shard, a name in two shards)."""
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard in shards:
        with _open(shard.path) as f:
            header = _header(f, shard)
        if shard.names is not None:
            absent = sorted(set(shard.names) - set(header))
            if absent:
                problems.append(f"index says {shard.name} holds {_listing(absent, 5)} but it "
                                "does not")
        for name, info in header.items():
            if name in tensors:
                problems.append(f"{_short(name)} appears in more than one shard")
            else:
                tensors[name] = info
    return tensors, problems


def _header(f, shard: Shard) -> dict[str, TensorInfo]:
    try:
        return {name: TensorInfo(shard, tuple(sl.get_shape()), sl.get_dtype())
                for name in f.keys() for sl in (f.get_slice(name),)}
    except Exception as e:  # noqa: BLE001 - the library validated the header; never expected
        raise _unreadable(shard.path, e) from e


def check_against_config(tensors: dict[str, TensorInfo], cfg: ModelConfig) -> list[str]:
    """Every way the headers disagree with the config (empty: they match)."""
    # The layer count first, from the names alone: only when it matches is the expected
    # name -> shape table built, whose size grows with the config's layer count.
    layers = sorted({int(m.group(1)) for name in tensors if (m := _LAYER.match(name))})
    if len(layers) != cfg.num_layers or (layers and layers[-1] != cfg.num_layers - 1):
        found = (f"{len(layers)} layers (model.layers.{layers[0]} to model.layers.{layers[-1]})"
                 if layers else "no layers")
        return [f"config.json says num_hidden_layers = {cfg.num_layers} but the weight files "
                f"hold {found}; the config does not belong to these weights"]
    expected = expected_shapes(cfg)
    problems: list[str] = []
    unexpected: list[str] = []
    for name, info in tensors.items():
        if name not in expected:
            if not _ignored(name, cfg):
                unexpected.append(name)
        elif info.shape != expected[name]:
            problems.append(f"{name} has shape {_shape(info.shape)}, config says {expected[name]}")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"{name} has dtype {info.dtype}; floating point expected "
                            f"({', '.join(FLOAT_DTYPES)})")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) the config does not account for: "
                        f"{_listing(sorted(unexpected))}")
    return problems


def check_checkpoint(path: str, cfg: ModelConfig):
    """Phase 1 alone: the weight files and their headers against the config. Returns
    (shards, tensors); ModelLoadError listing every problem."""
    shards = find_weight_files(path)
    tensors, problems = read_headers(shards)
    problems += check_against_config(tensors, cfg)
    if problems:
        raise ModelLoadError(f"checkpoint {path!r} does not match its config.json "
                             f"({cfg.architecture}, {cfg.num_layers} layers, hidden "
                             f"{cfg.hidden_size}):\n  - " + "\n  - ".join(problems))
    return shards, tensors


def load_weights(path: str, cfg: ModelConfig, device: torch.device | str,
                 dtype: torch.dtype, plan=None) -> dict[str, torch.Tensor]:
    """Check every header against the config (phase 1), then read, cast, move and fuse
    (phase 2).

    Returns engine names: `embed`, `norm`, `lm_head` (the embedding when tied) and per
    layer `layers.{i}.{attn_norm, qkv, qkv_bias?, o, o_bias?, mlp_norm, gate_up,
    gate_up_bias?, down, down_bias?}`. With a tensor-parallel `plan`
    (`sharding.ShardPlan`), only this rank's slices are read and the fused weights are
    its shards.
    """
    path = os.fspath(path)
    shards, tensors = check_checkpoint(path, cfg)
    wanted: dict[str, list[str]] = defaultdict(list)     # shard name -> tensors to read
    for name, info in tensors.items():
        if not _ignored(name, cfg):
            wanted[info.shard.name].append(name)
    raw: dict[str, torch.Tensor] = {}
    for shard in shards:
        if wanted[shard.name]:
            with _open(shard.path) as f:
                for name in wanted[shard.name]:
                    t = _read(f, name, shard.path, plan, tensors[name].shape)
                    raw[name] = t.to(device=device, dtype=dtype)
                    del t
    return fuse_weights(raw, cfg if plan is None else plan.local_config(cfg))


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """A saved tensor the engine does not use (a buffer, or the lm_head of a tied model)."""
    return bool(_IGNORED.match(name)) or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def _regular(path: str) -> bool:
    """A regular file (following links): not a FIFO, device or folder."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _check_header_size(path: str) -> None:
    """Refuse a header longer than any real one before the library parses it (its own
    limit is 100 MB: millions of tensor entries, gigabytes once parsed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise _unreadable(path, e) from e
    if len(head) == 8 and int.from_bytes(head, "little") > MAX_HEADER_BYTES:
        raise ModelLoadError(f"{path}: its safetensors header is "
                             f"{int.from_bytes(head, 'little'):,} bytes, more than any real "
                             f"checkpoint's (at most {MAX_HEADER_BYTES:,}: ~{MAX_TENSORS:,} "
                             "tensors); the file is corrupt or hostile")


def _open(path: str):
    if not _regular(path):
        raise ModelLoadError(f"{path} is not a regular file (a FIFO, device or folder?); a "
                             "safetensors file is expected")
    _check_header_size(path)
    try:
        return safetensors.safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        raise _unreadable(path, e) from e


def _read(f, name: str, path: str, plan=None, shape=()) -> torch.Tensor:
    try:
        return f.get_tensor(name) if plan is None else plan.read(f, name, shape)
    except Exception as e:  # noqa: BLE001 - data region unreadable
        raise ModelLoadError(f"cannot read tensor {name} from {path}: {str(e)[:200]}; the "
                             "file is truncated or corrupt") from e


def _unreadable(path: str, e: Exception) -> ModelLoadError:
    # the library's message may quote the header (a hostile one: megabytes): keep its start
    return ModelLoadError(f"cannot read {path}: {str(e)[:200]}. The file is corrupt or "
                          "truncated (a safetensors header followed by the tensor data is "
                          "expected); re-download or re-save it")


def _short(name: str, n: int = 80) -> str:
    """A tensor or file name from an untrusted file, at most about n characters."""
    return name if len(name) <= n else f"{name[:n]}… ({len(name)} characters)"


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(_short(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shape(shape: tuple[int, ...]) -> str:
    if len(shape) <= 8:
        return str(shape)
    return f"({', '.join(map(str, shape[:4]))}, … {len(shape)} dimensions)"


def fuse_weights(raw: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    w: dict[str, torch.Tensor] = {"embed": raw.pop("model.embed_tokens.weight"),
                                  "norm": raw.pop("model.norm.weight")}
    w["lm_head"] = w["embed"] if cfg.tie_word_embeddings else raw.pop("lm_head.weight")
    for layer in range(cfg.num_layers):
        p, q = f"model.layers.{layer}.", f"layers.{layer}."
        a, m = p + "self_attn.", p + "mlp."
        w[q + "attn_norm"] = raw.pop(p + "input_layernorm.weight")
        if cfg.is_gemma2:        # the same name is the norm AFTER the attention there
            w[q + "post_attn_norm"] = raw.pop(p + "post_attention_layernorm.weight")
            w[q + "mlp_norm"] = raw.pop(p + "pre_feedforward_layernorm.weight")
            w[q + "post_mlp_norm"] = raw.pop(p + "post_feedforward_layernorm.weight")
        else:
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
