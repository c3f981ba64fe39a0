"""Small helpers shared by the end-to-end benchmark suite (run.py, baselines.py) and
bench_backend.py: device sync and timing, failure recording, model shapes and weight bytes.

Imports nothing of wsd_engine at the top: the CPU smoke sets TRITON_INTERPRET=1 before any
kernel module is imported.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import os
import platform
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_layers=2, vocab_size=1000, hidden_size=256, intermediate_size=512,
            num_heads=4, num_kv_heads=2, head_dim=64)


def ensure_kernels_importable() -> str:
    """`wsd_engine.kernels` is `kernels/` (setup.py's package_dir). Without `pip install -e .`
    (a bare checkout on a GPU box) alias it in memory; no file is written."""
    try:
        if importlib.util.find_spec("wsd_engine.kernels") is not None:
            return "installed"
    except (ImportError, ValueError):
        pass
    kdir = os.path.join(REPO, "kernels")
    init = os.path.join(kdir, "__init__.py")
    if not os.path.isfile(init):
        return "missing"
    spec = importlib.util.spec_from_file_location("wsd_engine.kernels", init,
                                                  submodule_search_locations=[kdir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["wsd_engine.kernels"] = mod
    spec.loader.exec_module(mod)
    import wsd_engine
    wsd_engine.kernels = mod
    return "aliased from kernels/"


# ------------------------------------------------------------------------- timing

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device):
    """(seconds, result) of fn(), synchronized on CUDA."""
    sync(dev)
    t0 = time.perf_counter()
    r = fn()
    sync(dev)
    return time.perf_counter() - t0, r


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- failures

def err_text(e: BaseException, limit: int = 2000) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    tail = "".join(tb)[-limit:]
    return f"{type(e).__name__}: {e}".strip()[:600] + ("\n" + tail if tail else "")


def short_err(s: str, n: int = 160) -> str:
    s = " ".join(str(s).split())
    s = s.replace("|", "\\|")
    return s if len(s) <= n else s[:n - 1] + "\u2026"


def attempt(dst: dict, key: str, fn, log) -> dict | None:
    """dst[key] = fn() or {"error": ...}; never raises (except KeyboardInterrupt)."""
    try:
        r = fn()
        dst[key] = r
        return r
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a benchmark records failures and goes on
        dst[key] = {"error": err_text(e)}
        log(f"    ! {key} failed: {short_err(f'{type(e).__name__}: {e}', 300)}")
        return None


# ------------------------------------------------------------------------- models

def model_cfg(preset: str, smoke: bool):
    from wsd_engine.config import preset_config
    cfg = preset_config(preset)
    return dataclasses.replace(cfg, **TINY) if smoke else cfg


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every weight but the embedding table (a row gather);
    tied embeddings counted once, as the lm_head."""
    tied = model.config.tie_word_embeddings
    w = model.weights
    n = sum(t.numel() * t.element_size() for k, t in w.items()
            if k != "embed" and not (k == "lm_head" and tied))
    if tied:
        n += w["embed"].numel() * w["embed"].element_size()
    return n


def prompt_ids(vocab: int, n: int, seed: int = 1234) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "matplotlib"):
        try:
            v[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001
            v[name] = None
    return v
