"""Making a `Model`: from a checkpoint folder (`load_model`), from already loaded weights
(`build_model`), or with random weights for measurements (`random_model`); the checks of
device, dtype, cache length, batch size and memory that come before any tensor is made.
"""
from __future__ import annotations

import os

import torch

from .cache import StaticKVCache
from .config import ModelConfig, describe_arg, parse_dtype
from .errors import ConfigError, UnsupportedModelError
from .loader import check_checkpoint, load_weights
from .memory import check_fits, host_rss
from .model import TorchOps, rope_tables
from .runner import Model

BACKENDS = ("torch", "triton")
DEFAULT_MAX_SEQ_LEN = 4096
MAX_BATCH_SIZE = 1024


def _make_ops(backend: str, cfg: ModelConfig, device: torch.device):
    if backend == "torch":
        return TorchOps(cfg)
    if backend == "triton":
        hd = cfg.head_dim
        if hd < 16 or hd & (hd - 1):   # the attention kernels' head tiles
            raise UnsupportedModelError(
                f"backend='triton' needs a head_dim that is a power of two >= 16 (this model "
                f"has {hd}); use backend='torch'")
        from .triton_ops import TritonOps  # lazy: imports Triton
        return TritonOps(cfg, device)
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def parse_device(device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a torch.device of those types, usable here."""
    try:
        dev = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {describe_arg(device)}: use 'cpu', 'cuda' or "
                          "'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use "
                              "device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(dev)!r}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one ('cuda' is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device()
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


def _resolve(cfg: ModelConfig, device, dtype, max_seq_len, backend, max_batch_size=1):
    device = parse_device(device)
    dtype = cfg.dtype if dtype is None else parse_dtype(dtype)
    if max_seq_len is None:
        max_seq_len = min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if cfg.sliding_window is not None:
            max_seq_len = min(max_seq_len, cfg.sliding_window)
    if (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
            or not 1 <= max_seq_len < 2 ** 40):
        raise ConfigError(f"max_seq_len must be a positive int (KV cache positions, below "
                          f"2**40), got {describe_arg(max_seq_len)}")
    cfg.check_context(max_seq_len)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_batch_size(max_batch_size)
    # weights + cache + RoPE, before any is made
    check_fits(cfg, device, dtype, max_seq_len, n_slots=max_batch_size)
    return device, dtype, max_seq_len


def check_batch_size(max_batch_size) -> int:
    if (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
            or not 1 <= max_batch_size <= MAX_BATCH_SIZE):
        raise ConfigError(f"max_batch_size must be an int in [1, {MAX_BATCH_SIZE}] (requests "
                          f"decoded together), got {describe_arg(max_batch_size)}")
    return max_batch_size


def build_model(cfg: ModelConfig, weights: dict, device, dtype, max_seq_len: int,
                backend: str = "torch", path: str = "", max_batch_size: int = 1) -> Model:
    """A Model around already loaded (fused, engine-named) weights: allocates the cache
    (`max_batch_size` slots) and RoPE tables. `load_model` uses it; benchmarks use it with
    random weights."""
    check_batch_size(max_batch_size)
    check_fits(cfg, device, dtype, max_seq_len, weights_loaded=True, n_slots=max_batch_size)
    ops = _make_ops(backend, cfg, device)
    cache = StaticKVCache.allocate(cfg.num_layers, cfg.num_kv_heads, max_seq_len, cfg.head_dim,
                                   dtype, device, n_slots=max_batch_size)
    cos, sin = rope_tables(cfg, max_seq_len, device)
    return Model(path=path, config=cfg, weights=weights, cache=cache, cos=cos, sin=sin,
                 ops=ops, device=device, dtype=dtype)


def checkpoint_path(path) -> str:
    """A checkpoint folder given as str or os.PathLike (ConfigError for anything else)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a checkpoint folder path (str or os.PathLike) is expected, got "
                          f"{describe_arg(path)}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise ConfigError("give the checkpoint folder as text (str), not bytes: decode it with "
                          "os.fsdecode")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"the checkpoint folder's path {path!r} is not valid UTF-8 (bytes "
                          "from another encoding); the safetensors reader needs a UTF-8 path: "
                          "rename the folder or link it under a UTF-8 name") from None
    return path


def load_model(path, device="cpu", dtype=None, max_seq_len: int | None = None,
               backend: str = "torch", max_batch_size: int = 1,
               tensor_parallel: int = 1) -> Model:
    """Load a Llama / Qwen2 / Mistral safetensors checkpoint folder into the engine.

    dtype: None keeps the checkpoint's dtype; else torch.float32 / bfloat16 / float16.
    max_seq_len: KV cache length (default min(max_position_embeddings, 4096)).
    backend: "torch" (reference, runs anywhere) or "triton" (the fused kernels).
    max_batch_size: KV cache slots, the most sequences a WSD engine runs together.
    tensor_parallel: N > 1 splits the model over N ranks (`sharding`, `parallel`): this
    process is rank 0 on `device` ('cuda': ranks on cuda:0..N-1, NCCL; 'cpu': N processes,
    gloo), the others are worker processes started here and stopped by `Model.close()`
    (or a `with` block, or at exit). Each rank reads only its slices of the checkpoint.
    """
    path = checkpoint_path(path)
    cfg = ModelConfig.from_pretrained(path)
    if _tensor_parallel(tensor_parallel) > 1:
        return _load_parallel(cfg, dict(path=path), device, dtype, max_seq_len, backend,
                              max_batch_size, tensor_parallel)
    device, dtype, max_seq_len = _resolve(cfg, device, dtype, max_seq_len, backend,
                                          max_batch_size)
    _make_ops(backend, cfg, device)          # fail on a bad backend before reading weights
    before = host_rss()["rss"]
    weights = load_weights(path, cfg, device, dtype)
    model = build_model(cfg, weights, device, dtype, max_seq_len, backend, path, max_batch_size)
    model.load_memory = dict(host_rss(), before=before)
    return model


def random_model(cfg: ModelConfig, device="cpu", dtype=torch.bfloat16, max_seq_len: int = 4096,
                 backend: str = "torch", seed: int = 0, max_batch_size: int = 1,
                 tensor_parallel: int = 1) -> Model:
    """A model of cfg's shapes with random weights made on the device (never zeros):
    for speed measurements at real shapes without a checkpoint. No tokenizer.
    tensor_parallel: as `load_model`; each rank makes only its own shards (random, so
    a split model is not the same model as an unsplit one of the same seed)."""
    if _tensor_parallel(tensor_parallel) > 1:
        return _load_parallel(cfg, dict(config=cfg, seed=seed), device, dtype, max_seq_len,
                              backend, max_batch_size, tensor_parallel)
    device, dtype, max_seq_len = _resolve(cfg, device, dtype, max_seq_len, backend,
                                          max_batch_size)
    return build_model(cfg, _random_weights(cfg, device, dtype, seed), device, dtype,
                       max_seq_len, backend, max_batch_size=max_batch_size)


def _random_weights(cfg: ModelConfig, device, dtype, seed: int, plan=None) -> dict:
    from .loader import expected_shapes, fuse_weights
    g = torch.Generator(device=device).manual_seed(seed)
    raw = {}
    for name, shape in expected_shapes(cfg).items():
        if plan is not None:
            shape = plan.shard_shape(name, shape)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:   # ~ 1/sqrt(fan_in) so activations stay O(1) through the layers
            t = torch.randn(shape, generator=g, device=device) * (shape[-1] ** -0.5)
        if plan is not None and plan.part(name) == "zeros":
            t = torch.zeros(shape, device=device)
        raw[name] = t.to(dtype)
    return fuse_weights(raw, cfg if plan is None else plan.local_config(cfg))


# ---- tensor parallelism -------------------------------------------------------------------
def _tensor_parallel(n) -> int:
    from .sharding import MAX_TENSOR_PARALLEL
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TENSOR_PARALLEL:
        raise ConfigError(f"tensor_parallel must be an int in [1, {MAX_TENSOR_PARALLEL}] (ranks "
                          f"the model is split over), got {describe_arg(n)}")
    return n


def _load_parallel(cfg: ModelConfig, source: dict, device, dtype, max_seq_len, backend,
                   max_batch_size, world: int) -> Model:
    """Every check on rank 0 first (the split, devices, memory per rank, the checkpoint's
    headers: a bad checkpoint is reported here, before any worker starts), then the ranks."""
    from . import parallel
    from .sharding import ShardPlan, check_splits
    check_splits(cfg, world)
    local = ShardPlan.make(cfg, world, 0).local_config(cfg)
    job = parallel.torchrun_world()
    if job is not None:                  # this rank's GPU, before anything touches one
        device = parallel.torchrun_device(parse_device(device))
    device, dtype, max_seq_len = _resolve(local, device, dtype, max_seq_len, backend,
                                          max_batch_size)
    _make_ops(backend, local, device)
    spec = dict(source, device=device.type, dtype=str(dtype).replace("torch.", ""),
                max_seq_len=max_seq_len, backend=backend, max_batch_size=max_batch_size)

    def check():
        if "path" in source:
            check_checkpoint(source["path"], cfg)
    if job is not None:                  # every process of a torchrun job is here
        if job != world:
            raise ConfigError(f"this process was started by torchrun with WORLD_SIZE={job}; "
                              f"tensor_parallel must equal it (got {world})")
        return parallel.join_torchrun(world, device, check, lambda g: load_shard(spec, g))
    parallel.check_devices(device, world)
    check()
    return parallel.launch(world, device, spec, lambda group: load_shard(spec, group))


def load_shard(spec: dict, group: dict) -> Model:
    """One rank's shard of a tensor-parallel model (rank 0 and every worker run this)."""
    from .config import parse_dtype
    from .parallel import TPGroup, rank_device
    from .sharding import ShardPlan
    rank, world = group["rank"], group["world"]
    cfg = spec["config"] if "config" in spec else ModelConfig.from_pretrained(spec["path"])
    plan = ShardPlan.make(cfg, world, rank)
    device = rank_device(torch.device(spec["device"]), group.get("local_rank", rank))
    dtype = parse_dtype(spec["dtype"])
    before = host_rss()["rss"]
    if "path" in spec:
        weights = load_weights(spec["path"], cfg, device, dtype, plan=plan)
    else:
        weights = _random_weights(cfg, device, dtype, spec["seed"] * 1000 + rank, plan)
    model = build_model(plan.local_config(cfg), weights, device, dtype, spec["max_seq_len"],
                        spec["backend"], spec.get("path", ""), spec["max_batch_size"])
    model.tp = TPGroup(rank, world, plan, group["store"], group["ctl"], group["dev"], device,
                       cfg.vocab_size, group["procs"], lock=model.lock)
    model.load_memory = dict(host_rss(), before=before)
    return model

