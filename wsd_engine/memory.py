"""Will a model fit? The bytes `load_model` allocates (weights, KV cache, RoPE tables),
estimated from the config alone, against the memory free on the target device.

Checked before anything is allocated or read, so that a config (or a max_seq_len) that
cannot fit fails at once with a ConfigError saying what to change, instead of a raw
allocator error halfway through loading, or a machine that swaps until it is killed.
"""
from __future__ import annotations

import os

import torch

from .config import ModelConfig
from .errors import ConfigError


def weight_elements(cfg: ModelConfig) -> int:
    """Number of weight elements: the checkpoint's (fusing q/k/v and gate/up keeps it)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    layer = 2 * d + 2 * cfg.q_size * d + 2 * cfg.kv_size * d + 3 * i * d  # norms, q o, k v, mlp
    if cfg.is_gemma2:
        layer += 2 * d                                       # its post-attention / -MLP norms
    if cfg.qkv_bias:
        layer += cfg.q_size + 2 * cfg.kv_size
    if cfg.o_bias:
        layer += d
    if cfg.mlp_bias:
        layer += 2 * i + d
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)  # embed, lm_head
    return embeddings + d + cfg.num_layers * layer                            # + final norm


def estimate(cfg: ModelConfig, dtype: torch.dtype, max_seq_len: int,
             n_slots: int = 1) -> dict[str, int]:
    """Bytes of what a loaded model holds: {"weights", "kv_cache", "rope_tables"}; the
    cache has `n_slots` slots (the largest batch it serves)."""
    size = dtype.itemsize
    return {
        "weights": weight_elements(cfg) * size,
        # k and v: [layers, slots, kv_heads, max_seq_len, head_dim] each, in the model dtype
        "kv_cache": (2 * cfg.num_layers * n_slots * cfg.num_kv_heads * max_seq_len
                     * cfg.head_dim * size),
        # cos and sin: [max_seq_len, head_dim] fp32 each
        "rope_tables": 2 * max_seq_len * cfg.head_dim * 4,
    }


def available_bytes(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device`; None when unknown (nothing is refused).

    CPU: MemAvailable of /proc/meminfo (what can be allocated without swapping), else the
    free physical pages. CUDA: the free device memory plus what torch's caching allocator
    holds unused (it hands that out first)."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024         # the unit is kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits(cfg: ModelConfig, device, dtype: torch.dtype, max_seq_len: int,
               weights_loaded: bool = False, n_slots: int = 1) -> None:
    """ConfigError unless the weights (unless already loaded), the KV cache and the RoPE
    tables fit in the memory available on `device`."""
    need = estimate(cfg, dtype, max_seq_len, n_slots)
    if weights_loaded:
        del need["weights"]
    total = sum(need.values())
    available = available_bytes(torch.device(device))
    if available is None or total <= available:
        return
    parts = ", ".join(f"{name.replace('_', ' ')} {_size(n)}" for name, n in need.items())
    per_position = (need["kv_cache"] + need["rope_tables"]) // max_seq_len
    raise ConfigError(
        f"the model does not fit on {device}: it needs about {_size(total)} ({parts}; "
        f"max_seq_len {max_seq_len}, {n_slots} cache slot(s), "
        f"{str(dtype).replace('torch.', '')}) but {_size(available)} "
        f"is available. Pass a smaller max_seq_len or max_batch_size (each position of the KV cache and RoPE "
        f"tables takes {_size(per_position)}) or a smaller dtype (bfloat16 or float16 halve "
        "float32), or use a device with more free memory")


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def check_buffers(what: str, n_bytes: int, device, fix: str) -> None:
    """ConfigError unless `n_bytes` more fit on `device` (an engine's own buffers)."""
    available = available_bytes(torch.device(device))
    if available is not None and n_bytes > available:
        raise ConfigError(f"{what} need {_size(n_bytes)} on {device} but {_size(available)} is "
                          f"available; {fix}")


def host_rss() -> dict[str, int]:
    """This process's resident host memory now and its peak so far, in bytes ({"rss",
    "peak"} from /proc/self/status; zeros where that is not available)."""
    out = {"rss": 0, "peak": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss" if key == "VmRSS" else "peak"] = int(val.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out
