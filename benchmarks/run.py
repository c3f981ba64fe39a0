"""End-to-end benchmark suite of wsd_engine (DESIGN §5): kernels, decode, WSD.

    python -m benchmarks.run                                   # CUDA: everything, real shapes
    python -m benchmarks.run --suite decode,wsd --time-budget 480 --out bench_out
    python -m benchmarks.run --pilot DIR --base DIR            # + the reference oracle
    python -m benchmarks.run --cpu-smoke                       # tiny shapes on CPU, < 60 s
    wsd-engine bench ...                                       # the same, from a checkout

Every timing is reported against the floor of the model it runs: the weight bytes one
decode step must read / the device's copy bandwidth (a 1 GiB device-to-device copy,
bytes read + written, measured first, in the same run), and against baselines measured in
the same run (HF transformers eager `generate`, HF static cache + torch.compile, base-only
decoding with this engine, `wsd_engine.reference` when checkpoint folders are given).
Random bf16 weights at real shapes (never zeros); no checkpoint or network needed.

Suites, most important numbers first (with --time-budget the rest is skipped and recorded):
  decode of the first preset (ours + HF eager) -> WSD 1B+8B -> HF compile of the first
  preset -> WSD 3B+8B -> checkpoints + reference -> the other presets -> kernels.

Writes into --out: results.json (everything; rewritten after each step, so a killed run
still leaves what it measured), results.md (tables), decode.png / wsd.png (matplotlib).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:                       # `python benchmarks/run.py` works too
    sys.path.insert(0, REPO)

PRESET_ORDER = ("llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "qwen2.5-7b")
PAIRS = (("llama3.2-1b", "llama3.1-8b"), ("llama3.2-3b", "llama3.1-8b"))
SUITES = ("kernels", "decode", "wsd")
TINY = dict(num_layers=2, vocab_size=1000, hidden_size=256, intermediate_size=512,
            num_heads=4, num_kv_heads=2, head_dim=64)
CKPT_PROMPT = "Explain, step by step, how a refrigerator keeps food cold."
SYSTEMS = {   # decode systems: key -> label (table / plot order)
    "engine_graph": "wsd_engine triton + CUDA graph",
    "engine_torch_eager": "wsd_engine torch backend, eager",
    "hf_eager": "HF transformers eager generate",
    "hf_compile": "HF static cache + torch.compile",
}
X2 = "{:.2f}\u00d7"                      # a ratio, "1.23x"
PHASES = ("pilot_prefill", "base_prefill", "drafting", "scoring", "continuation")

try:
    from benchmarks.bench_switch_score import copy_bandwidth_gbps
except ImportError:  # run as a script from benchmarks/
    from bench_switch_score import copy_bandwidth_gbps  # type: ignore


# ------------------------------------------------------------------------- small helpers

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


def model_cfg(preset: str, smoke: bool):
    from wsd_engine.config import preset_config
    cfg = preset_config(preset)
    return dataclasses.replace(cfg, **TINY) if smoke else cfg


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every weight but the embedding table (a row gather);
    tied embeddings counted once, as the lm_head (as in bench_backend.py)."""
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


# ------------------------------------------------------------------------- decode suite

def measure_engine(model, ids: list[int], n: int, floor_ms: float, reps: int, dev) -> dict:
    """Greedy `Model.generate` of n tokens after the prompt. Per-token decode time =
    (t(n) - t(1)) / (n - 1): prefill and first token cancel out."""
    model.generate(ids, min(4, n), stop_at_eos=False)                 # warm-up (JIT, caches)
    t1 = statistics.median(timed(lambda: model.generate(ids, 1, stop_at_eos=False), dev)[0]
                           for _ in range(reps))
    runs = [timed(lambda: model.generate(ids, n, stop_at_eos=False), dev) for _ in range(reps)]
    tn = statistics.median(r[0] for r in runs)
    if len(runs[0][1]) != n:
        raise RuntimeError(f"generate returned {len(runs[0][1])} tokens, expected {n}")
    dec_ms = max(tn - t1, 1e-9) / (n - 1) * 1e3
    return {"decode_ms_per_token": dec_ms, "tok_s": 1e3 / dec_ms,
            "frac_of_floor": floor_ms / dec_ms, "e2e_s": tn, "e2e_tok_s": n / tn,
            "prefill_and_first_token_s": t1, "reps": reps,
            "method": "Model.generate: (t(N) - t(1)) / (N - 1)"}


def hf_config(cfg):
    """A transformers config with the same shapes as a wsd_engine ModelConfig."""
    from transformers import LlamaConfig, Qwen2Config
    rp = {"rope_type": cfg.rope.type, "rope_theta": cfg.rope.theta}
    if cfg.rope.type in ("linear", "llama3"):
        rp["factor"] = cfg.rope.factor
    if cfg.rope.type == "llama3":
        rp.update(low_freq_factor=cfg.rope.low_freq_factor,
                  high_freq_factor=cfg.rope.high_freq_factor,
                  original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    bos = cfg.bos_token_id
    eos = [e for e in cfg.eos_token_ids if e < cfg.vocab_size]     # tiny smoke vocab
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rp,
              bos_token_id=bos if bos is not None and bos < cfg.vocab_size else None,
              eos_token_id=eos or None)
    if cfg.family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **kw)
    return LlamaConfig(head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias,
                       mlp_bias=cfg.mlp_bias, **kw)


def measure_hf(cfg, dev, dtype, ids: list[int], n: int, floor_ms: float, reps: int,
               compile_: bool) -> dict:
    """HF transformers greedy `generate` of exactly n tokens (min_new_tokens = n, no EOS),
    default random init (never zeros). Per-step timestamps from a StoppingCriteria (called
    once per generated token, after a device sync): decode ms = (t_last - t_first)/(n-1)."""
    import transformers
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kwargs):
            sync(dev)
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    t_build = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype)
    model = model.to(dev).eval()
    w = next(p for name, p in model.named_parameters() if "down_proj" in name)
    init_std = float(w.detach().float().std())
    if not init_std > 0:
        raise RuntimeError("HF model initialised to zeros; refusing to time it")
    build_s = time.perf_counter() - t_build
    gc_ = model.generation_config
    gc_.eos_token_id, gc_.pad_token_id = None, 0
    gc_.do_sample, gc_.temperature, gc_.top_p, gc_.top_k = False, None, None, None
    info = {"transformers": transformers.__version__, "dtype": str(dtype),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "init_std_down_proj": init_std, "build_s": build_s}
    if compile_:
        gc_.cache_implementation = "static"
        if hasattr(gc_, "disable_compile"):
            gc_.disable_compile = True            # we compile the forward ourselves
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        info.update(cache="static", compile='torch.compile(model.forward, '
                    'mode="reduce-overhead", fullgraph=True)')
    else:
        info.update(cache="dynamic (default)")
    inp = torch.tensor([ids], device=dev)
    mask = torch.ones_like(inp)

    def gen(m, stamps=None):
        with torch.inference_mode():
            return model.generate(inp, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                                  do_sample=False,
                                  stopping_criteria=StoppingCriteriaList([stamps] if stamps else []))

    # warm-up: eager needs little; compiled: same n (a static cache of another length
    # would recompile), twice (compile, then cudagraph recording)
    for i in range(2 if compile_ else 1):
        s, _ = timed(lambda: gen(n if compile_ else min(8, n)), dev)
        info.setdefault("warmup_s", []).append(s)
    dec, e2e = [], []
    for _ in range(reps):
        st = Stamps()
        s, out = timed(lambda st=st: gen(n, st), dev)
        got = out.shape[1] - inp.shape[1]
        if got != n or len(st.t) < 2:
            raise RuntimeError(f"HF generate produced {got} tokens ({len(st.t)} steps), "
                               f"expected {n}")
        dec.append((st.t[-1] - st.t[0]) / (len(st.t) - 1) * 1e3)
        e2e.append(s)
    dec_ms, tn = statistics.median(dec), statistics.median(e2e)
    model = None   # free it before returning
    free_memory(dev)
    info.update(decode_ms_per_token=dec_ms, tok_s=1e3 / dec_ms, frac_of_floor=floor_ms / dec_ms,
                e2e_s=tn, e2e_tok_s=n / tn, reps=reps,
                method="generate + StoppingCriteria timestamps: (t_last - t_first) / (N - 1)")
    return info


# ------------------------------------------------------------------------- subprocess workers

def worker_main(spec: dict) -> int:
    """Runs in a child process (`--worker SPEC.json`): the HF torch.compile baseline or the
    reference oracle, so a crash, a hang or a poisoned CUDA context stays out of the run."""
    out = spec["out"]
    try:
        if spec["kind"] == "hf_compile":
            dev = torch.device(spec["device"])
            cfg = model_cfg(spec["preset"], spec["smoke"])
            dtype = getattr(torch, spec["dtype"])
            res = measure_hf(cfg, dev, dtype, spec["ids"], spec["n"], spec["floor_ms"],
                             spec["reps"], compile_=True)
        elif spec["kind"] == "reference":
            from wsd_engine.reference import ReferenceWSD
            t0 = time.perf_counter()
            ref = ReferenceWSD(spec["pilot"], spec["base"])
            load_s = time.perf_counter() - t0
            s, r = timed(lambda: ref.generate(spec["prompt"], window=spec["window"],
                                              threshold=spec["threshold"],
                                              draft_max_tokens=spec["draft_max_tokens"],
                                              max_new_tokens=spec["max_new_tokens"]),
                         torch.device("cpu"))
            res = {"total_s": s, "load_s": load_s, "switch_index": r.switch_index,
                   "switched": r.switched, "n_tokens": len(r.token_ids),
                   "draft_tokens": len(r.draft_ids), "token_ids": r.token_ids,
                   "finish_reason": r.finish_reason,
                   "note": "transformers, fp32, CPU (the oracle has no device option)"}
        else:
            raise ValueError(f"unknown worker kind {spec['kind']!r}")
    except BaseException as e:  # noqa: BLE001 - report to the parent
        res = {"error": err_text(e)}
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


def run_worker(spec: dict, timeout: float, log_path: str, log) -> dict:
    spec_path = log_path[:-4] + ".spec.json"
    spec = dict(spec, out=log_path[:-4] + ".result.json")
    if os.path.exists(spec["out"]):
        os.remove(spec["out"])
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", spec_path]
    log(f"    (child process, timeout {timeout:.0f} s, log {os.path.relpath(log_path)})")
    t0 = time.perf_counter()
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the child and its compile workers
            except OSError:
                proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s (killed); log: {log_path}",
                    "timed_out": True}
    wall = time.perf_counter() - t0
    if os.path.isfile(spec["out"]):
        with open(spec["out"]) as f:
            res = json.load(f)
        res["child_wall_s"] = wall
        return res
    with open(log_path, errors="replace") as f:
        tail = f.read()[-1500:]
    return {"error": f"child exited with code {rc} and no result; log tail:\n{tail}"}


# ------------------------------------------------------------------------- the bench

class Bench:
    def __init__(self, a):
        self.a = a
        self.t0 = time.perf_counter()
        self.smoke = a.cpu_smoke
        self.dev = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.backend = "torch" if self.smoke else "triton"
        self.graphs = not self.smoke
        os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
        self.R = {
            "meta": {"device": (f"{torch.cuda.get_device_name()} ("
                                f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
                                " GiB)" if self.dev.type == "cuda"
                                else f"CPU ({platform.processor() or platform.machine()}, "
                                     f"{os.cpu_count()} cores)"),
                     "versions": versions(), "date": datetime.datetime.now().isoformat(
                         timespec="seconds"), "argv": a.argv, "cpu_smoke": self.smoke,
                     "dtype": str(self.dtype), "backend": self.backend,
                     "cuda_graphs": self.graphs, "notes": list(a.notes),
                     "settings": {"prompt_len": a.prompt_len, "decode_steps": a.steps,
                                  "response": a.response, "ks": a.ks, "chunk": a.chunk,
                                  "reps": a.reps, "presets": a.presets, "suites": a.suites,
                                  "time_budget_s": a.time_budget}},
            "copy_gbps": None, "models": {}, "decode": {}, "wsd": {}, "kernels": {},
            "tasks": [], "skipped": [], "errors": [],
        }
        self.bar = None
        self.floors = {}

    # -- logging / bookkeeping
    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def attempt(self, dst: dict, key: str, fn, what: str):
        """attempt() that also lists a failure under "errors" (and in results.md)."""
        r = attempt(dst, key, fn, self.log)
        if r is None:
            self.R["errors"].append({"task": what, "error": dst[key]["error"]})
        return r

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float | None:
        return None if self.a.time_budget is None else self.a.time_budget - self.elapsed()

    def save(self) -> None:
        self.R["elapsed_s"] = self.elapsed()
        path = os.path.join(self.a.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.R, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        with open(os.path.join(self.a.out, "results.md"), "w") as f:
            f.write(render_md(self.R))

    def run_tasks(self, tasks) -> None:
        self.bar = None
        if sys.stderr.isatty() or os.environ.get("BENCH_TQDM") == "1":
            try:   # a bar only on a terminal: in a piped log it is noise; lines say enough
                from tqdm import tqdm
                self.bar = tqdm(total=len(tasks), desc="bench", unit="step",
                                dynamic_ncols=True)
            except ImportError:
                pass
        for i, (name, fn) in enumerate(tasks, 1):
            rem = self.remaining()
            if rem is not None and rem <= 0:
                self.R["skipped"].append({"task": name, "reason":
                                          f"time budget {self.a.time_budget:.0f} s spent"})
                self.R["tasks"].append({"task": name, "status": "skipped"})
                self.log(f"[{i}/{len(tasks)}] {name}: skipped (time budget spent)")
            else:
                self.log(f"[{i}/{len(tasks)}] {name} (t = {self.elapsed():.0f} s)")
                t = time.perf_counter()
                if self.dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                status = "ok"
                try:
                    fn()
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: BLE001 - record and go on
                    status = "error"
                    self.R["errors"].append({"task": name, "error": err_text(e)})
                    self.log(f"    ! {name} failed: {short_err(f'{type(e).__name__}: {e}', 300)}")
                rec = {"task": name, "status": status, "seconds": time.perf_counter() - t}
                if self.dev.type == "cuda":
                    rec["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
                self.R["tasks"].append(rec)
                free_memory(self.dev)
            if self.bar is not None:
                self.bar.update(1)
            self.save()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- steps
    def copy_bandwidth(self) -> None:
        gbps = copy_bandwidth_gbps(self.dev)
        self.R["copy_gbps"] = gbps
        self.log(f"    copy bandwidth: {gbps:.0f} GB/s (bytes read + written / time)")

    def bw(self) -> float:
        """Copy GB/s (NaN if that step failed: floors become NaN, timings still count)."""
        return self.R["copy_gbps"] or float("nan")

    def _floor(self, name: str, model) -> float:
        wb = weight_bytes(model)
        floor_ms = wb / (self.bw() * 1e9) * 1e3
        self.R["models"][name] = {"weight_bytes": wb, "floor_ms_per_token": floor_ms,
                                  "floor_tok_s": 1e3 / floor_ms,
                                  "layers": model.config.num_layers,
                                  "hidden": model.config.hidden_size,
                                  "vocab": model.config.vocab_size}
        self.floors[name] = floor_ms
        return floor_ms

    def _decode_entry(self, preset: str) -> dict:
        return self.R["decode"].setdefault(preset, {"systems": {}})

    def decode_engine(self, preset: str) -> None:
        from wsd_engine.runner import build_model, random_model
        a, dev = self.a, self.dev
        cfg = model_cfg(preset, self.smoke)
        e = self._decode_entry(preset)
        msl = a.prompt_len + a.steps + 8
        m = random_model(cfg, dev, self.dtype, max_seq_len=msl, backend=self.backend, seed=0)
        floor_ms = self._floor(preset, m)
        e.update(floor_ms_per_token=floor_ms, floor_tok_s=1e3 / floor_ms)
        ids = prompt_ids(cfg.vocab_size, a.prompt_len)
        sysd = e["systems"]
        if self.graphs:
            self.log(f"    {preset}: {SYSTEMS['engine_graph']}")

            def graph():
                m.capture_decode()
                return measure_engine(m, ids, a.steps, floor_ms, a.reps, dev)
            self.attempt(sysd, "engine_graph", graph, f"decode {preset} engine_graph")
            tm = build_model(cfg, m.weights, dev, self.dtype, msl, backend="torch")
        else:
            tm = m
            sysd["engine_graph"] = {"skipped": "CPU smoke: no CUDA graphs (torch backend only)"}
        self.log(f"    {preset}: {SYSTEMS['engine_torch_eager']}")
        self.attempt(sysd, "engine_torch_eager",
                     lambda: measure_engine(tm, ids, a.steps, floor_ms, a.reps, dev),
                     f"decode {preset} engine_torch_eager")
        m = tm = None               # free before the next step

    def decode_hf(self, preset: str) -> None:
        a, dev = self.a, self.dev
        cfg = model_cfg(preset, self.smoke)
        e = self._decode_entry(preset)
        floor_ms = self.floors.get(preset) or self._floor_from_cfg(preset, cfg)
        ids = prompt_ids(cfg.vocab_size, a.prompt_len)
        self.log(f"    {preset}: {SYSTEMS['hf_eager']}")
        self.attempt(e["systems"], "hf_eager",
                     lambda: measure_hf(cfg, dev, self.dtype, ids, a.steps, floor_ms,
                                        max(1, min(a.reps, 2)), compile_=False),
                     f"decode {preset} hf_eager")

    def decode_hf_compile(self, preset: str) -> None:
        a, dev = self.a, self.dev
        e = self._decode_entry(preset)
        if self.smoke or a.no_hf_compile:
            e["systems"]["hf_compile"] = {"skipped": "CPU smoke: no torch.compile baseline"
                                          if self.smoke else "--no-hf-compile"}
            return
        cfg = model_cfg(preset, self.smoke)
        floor_ms = self.floors.get(preset) or self._floor_from_cfg(preset, cfg)
        ids = prompt_ids(cfg.vocab_size, a.prompt_len)
        self.log(f"    {preset}: {SYSTEMS['hf_compile']}")
        timeout = a.worker_timeout
        rem = self.remaining()
        if rem is not None:
            timeout = max(30.0, min(timeout, rem))
        spec = {"kind": "hf_compile", "preset": preset, "smoke": self.smoke,
                "device": str(dev), "dtype": str(self.dtype).split(".")[-1], "ids": ids,
                "n": a.steps, "floor_ms": floor_ms, "reps": max(1, min(a.reps, 2))}
        res = run_worker(spec, timeout, os.path.join(a.out, "logs", f"hf_compile_{preset}.log"),
                         self.log)
        if "error" in res:
            self.log(f"    ! hf_compile failed: {short_err(res['error'], 300)}")
            self.R["errors"].append({"task": f"decode {preset} hf_compile",
                                     "error": res["error"]})
        e["systems"]["hf_compile"] = res

    def _floor_from_cfg(self, preset, cfg) -> float:
        """The floor from shapes alone (when our model of a preset was not built: its
        step failed or was skipped). Same count as weight_bytes()."""
        from wsd_engine.loader import expected_shapes
        esize = torch.tensor([], dtype=self.dtype).element_size()
        n = sum(math.prod(shape) * esize for name, shape in expected_shapes(cfg).items()
                if not (name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings))
        floor_ms = n / (self.bw() * 1e9) * 1e3
        self.R["models"][preset] = {"weight_bytes": n, "floor_ms_per_token": floor_ms,
                                    "floor_tok_s": 1e3 / floor_ms, "from": "shapes"}
        self.floors[preset] = floor_ms
        self._decode_entry(preset).update(floor_ms_per_token=floor_ms,
                                          floor_tok_s=1e3 / floor_ms)
        return floor_ms

    def wsd_pair(self, pilot_name: str, base_name: str) -> None:
        from wsd_engine.engine import WSD, WSDParams
        from wsd_engine.runner import random_model
        a, dev = self.a, self.dev
        key = f"{pilot_name} + {base_name}"
        e = self.R["wsd"].setdefault(key, {"pilot": pilot_name, "base": base_name, "runs": []})
        pc, bc = model_cfg(pilot_name, self.smoke), model_cfg(base_name, self.smoke)
        msl = a.prompt_len + a.response + 64
        pilot = random_model(pc, dev, self.dtype, max_seq_len=msl, backend=self.backend, seed=0)
        base = random_model(bc, dev, self.dtype, max_seq_len=msl, backend=self.backend, seed=1)
        fp, fb = self._floor(pilot_name, pilot), self._floor(base_name, base)
        R_, c = a.response, a.chunk
        ids = prompt_ids(min(pc.vocab_size, bc.vocab_size), a.prompt_len)
        e.update(prompt_len=a.prompt_len, response=R_, chunk=c, pilot_floor_ms=fp,
                 base_floor_ms=fb, cuda_graphs=self.graphs)
        self.log(f"    {key}: engine set-up" + (" (capturing CUDA graphs)" if self.graphs else ""))
        wsd = WSD(pilot, base, cuda_graphs=self.graphs, graph_chunks=(c,))
        wsd.generate_ids(ids, ids, WSDParams(draft_max_tokens=min(R_, 4 * c),   # warm-up
                                             max_new_tokens=min(R_, 6 * c), chunk=c,
                                             force_switch=min(c, R_), ignore_eos=True))

        def ideal_s(k: int, n: int) -> float:
            return (fp + fb + k * fp + math.ceil(k / c) * fb + (n - k) * fb) / 1e3

        def one_k(k: int) -> dict:
            p = WSDParams(draft_max_tokens=R_, max_new_tokens=R_, chunk=c, force_switch=k,
                          ignore_eos=True)
            runs = [wsd.generate_ids(ids, ids, p) for _ in range(a.reps)]
            runs.sort(key=lambda r: r.timings["total"])
            r = runs[(len(runs) - 1) // 2]
            if len(r.token_ids) != R_:
                raise RuntimeError(f"WSD returned {len(r.token_ids)} tokens, expected {R_}")
            ki = r.switch_index
            ideal = ideal_s(ki, R_)
            return {"k": k, "label": f"k={k}" if k else f"never (k={ki})", "switch_index": ki,
                    "switched": r.switched, "draft_tokens": r.draft_tokens,
                    "base_tokens": r.base_tokens, "total_s": r.timings["total"],
                    "timings": {ph: r.timings.get(ph, 0.0) for ph in PHASES},
                    "all_totals_s": [x.timings["total"] for x in runs],
                    "ideal_s": ideal, "measured_over_ideal": r.timings["total"] / ideal,
                    "tok_s": R_ / r.timings["total"]}

        for k in a.ks:
            self.log(f"    {key}: WSD, response {R_}, switch forced at "
                     f"{k if k else 'never'}")
            holder: dict = {}
            res = self.attempt(holder, "run", lambda k=k: one_k(k), f"wsd {key} k={k}")
            if res is None:
                res = {"k": k, "label": f"k={k}" if k else "never",
                       "error": holder["run"]["error"]}
            e["runs"].append(res)

        self.log(f"    {key}: base-only decoding of {R_} tokens "
                 f"({'graph' if self.graphs else 'eager'} decode)")

        def base_only() -> dict:
            runs = [timed(lambda: base.generate(ids, R_, stop_at_eos=False), dev)
                    for _ in range(a.reps)]
            s = statistics.median(r[0] for r in runs)
            ideal = (fb + R_ * fb) / 1e3
            return {"total_s": s, "ideal_s": ideal, "measured_over_ideal": s / ideal,
                    "tok_s": R_ / s, "all_totals_s": [r[0] for r in runs]}
        bo = self.attempt(e, "base_only", base_only, f"wsd {key} base-only")
        for r in e["runs"]:
            if bo and "total_s" in r:
                r["speedup_vs_base_only"] = bo["total_s"] / r["total_s"]
                r["beats_base_only"] = r["total_s"] < bo["total_s"]
        e["reference"] = {"skipped": "needs --pilot DIR --base DIR (the oracle runs on "
                                     "checkpoints with tokenizers, not on random weights)"}
        wsd = pilot = base = None

    def checkpoints(self) -> None:
        """The given checkpoint pair: this engine (the real rule) vs wsd_engine.reference on
        the same text prompt and settings."""
        from wsd_engine.engine import WSD, WSDParams
        a, dev = self.a, self.dev
        e = self.R["wsd"].setdefault("checkpoints", {"pilot": a.pilot, "base": a.base,
                                                     "prompt": CKPT_PROMPT, "runs": []})
        R_ = a.response
        params = dict(window=6, threshold=0.8, draft_max_tokens=R_, max_new_tokens=R_)
        e["params"] = dict(params, chunk=a.chunk)
        self.log("    checkpoints: this engine (the switch rule, not forced)")

        def ours() -> dict:
            wsd = WSD.from_pretrained(a.pilot, a.base, device=dev,
                                      dtype=None if self.smoke else torch.bfloat16,
                                      backend=self.backend, cuda_graphs=self.graphs,
                                      graph_chunks=(a.chunk,))
            fp, fb = self._floor("ckpt pilot", wsd.pilot), self._floor("ckpt base", wsd.base)
            wsd.generate(CKPT_PROMPT, WSDParams(**dict(params, draft_max_tokens=min(R_, 16),
                                                       max_new_tokens=min(R_, 24)),
                                                chunk=a.chunk))          # warm-up
            r = wsd.generate(CKPT_PROMPT, WSDParams(**params, chunk=a.chunk))
            k, n = r.switch_index, len(r.token_ids)
            ideal = (fp + fb + k * fp + math.ceil(k / a.chunk) * fb + max(n - k, 0) * fb) / 1e3
            out = {"total_s": r.timings["total"], "timings": {ph: r.timings.get(ph, 0.0)
                                                               for ph in PHASES},
                   "switch_index": k, "switched": r.switched, "n_tokens": n,
                   "draft_tokens": r.draft_tokens, "finish_reason": r.finish_reason,
                   "token_ids": r.token_ids, "ideal_s": ideal,
                   "measured_over_ideal": r.timings["total"] / ideal}
            wsd = None
            free_memory(dev)
            return out
        mine = self.attempt(e, "engine", ours, "wsd checkpoints engine")
        self.log("    checkpoints: wsd_engine.reference (transformers oracle, CPU fp32)")
        timeout = a.worker_timeout
        rem = self.remaining()
        if rem is not None:
            timeout = max(30.0, min(timeout, rem))
        ref = run_worker(dict(kind="reference", pilot=a.pilot, base=a.base, prompt=CKPT_PROMPT,
                              **params), timeout,
                         os.path.join(a.out, "logs", "reference.log"), self.log)
        e["reference"] = ref
        if "error" in ref:
            self.R["errors"].append({"task": "wsd checkpoints reference", "error": ref["error"]})
        if mine and "total_s" in ref:
            ref["speedup_of_engine"] = ref["total_s"] / mine["total_s"]
            same = next((i for i, (x, y) in enumerate(zip(mine["token_ids"], ref["token_ids"]))
                         if x != y), min(len(mine["token_ids"]), len(ref["token_ids"])))
            ref["identical_prefix_tokens"] = same
            ref["identical"] = mine["token_ids"] == ref["token_ids"]

    def kernel(self, name: str) -> None:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        os.makedirs(os.path.join(self.a.out, "kernels"), exist_ok=True)
        path = os.path.join(self.a.out, "kernels", f"{name}.json")
        if os.path.exists(path):
            os.remove(path)
        argv = ["--out", path] + (["--cpu-smoke"] if self.smoke else [])
        if name == "layers" and not self.smoke:
            argv.append("--no-compile")            # as gpu_check.sh: keeps it short
        try:
            rc = mod.main(argv)
        except SystemExit as ex:                   # the scripts sys.exit() on a failed check
            rc = f"SystemExit({ex.code!r})"
        res = {"argv": argv}
        if os.path.isfile(path):
            with open(path) as f:
                res["result"] = json.load(f)
        else:
            res["error"] = f"no JSON written (main returned {rc!r})"
            self.R["errors"].append({"task": f"kernels {name}", "error": res["error"]})
        if isinstance(rc, (int, str)) and rc not in (0, None):
            res["returncode"] = rc
        self.R["kernels"][name] = res


def build_tasks(b: Bench) -> list:
    a = b.a
    decode, wsd, kern = ("decode" in a.suites), ("wsd" in a.suites), ("kernels" in a.suites)
    presets = list(a.presets)
    t = [("copy bandwidth (1 GiB D2D copy)" if not b.smoke else "copy bandwidth (CPU)",
          b.copy_bandwidth)]
    first, rest = (presets[0], presets[1:]) if presets else (None, [])
    pairs = [p for p in PAIRS]
    if decode and first:
        t += [(f"decode {first}: wsd_engine", lambda p=first: b.decode_engine(p)),
              (f"decode {first}: HF eager", lambda p=first: b.decode_hf(p))]
    if wsd and pairs:
        t.append((f"wsd {pairs[0][0]} + {pairs[0][1]}", lambda p=pairs[0]: b.wsd_pair(*p)))
    if decode and first:
        t.append((f"decode {first}: HF static + torch.compile",
                  lambda p=first: b.decode_hf_compile(p)))
    if wsd:
        for p in pairs[1:]:
            t.append((f"wsd {p[0]} + {p[1]}", lambda p=p: b.wsd_pair(*p)))
        if a.pilot and a.base:
            t.append(("wsd checkpoints: engine vs reference", b.checkpoints))
    if decode:
        for p in rest:
            t += [(f"decode {p}: wsd_engine", lambda p=p: b.decode_engine(p)),
                  (f"decode {p}: HF eager", lambda p=p: b.decode_hf(p)),
                  (f"decode {p}: HF static + torch.compile", lambda p=p: b.decode_hf_compile(p))]
    if kern:
        for k in ("switch_score", "attention", "layers"):
            t.append((f"kernels {k}", lambda k=k: b.kernel(k)))
    return t


# ------------------------------------------------------------------------- report

def _f(x, fmt="{:.2f}", none="\u2014"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def render_md(R: dict) -> str:
    m = R["meta"]
    v = m["versions"]
    L = [f"# wsd_engine benchmarks \u2014 {m['device']}", "",
         f"{m['date']}; torch {v['torch']}, triton {v.get('triton')}, transformers "
         f"{v.get('transformers')}; {m['dtype']}, backend {m['backend']}, CUDA graphs "
         f"{m['cuda_graphs']}" + ("; **CPU smoke (tiny shapes, numbers mean nothing)**"
                                  if m["cpu_smoke"] else ""), ""]
    for n in m.get("notes", []):
        L.append(f"> {n}")
    if R.get("copy_gbps"):
        L += [f"Copy bandwidth (bytes read + written / time): **{R['copy_gbps']:.0f} GB/s**. "
              "Floor of a model = weight bytes per decode step / copy bandwidth.", ""]
    if R["decode"]:
        s = m["settings"]
        L += ["## Decode (batch 1, greedy)", "",
              f"{s['decode_steps']} tokens after a {s['prompt_len']}-token prompt; decode "
              "ms/token excludes the prefill and first token (see results.json `method`).", "",
              "| model | system | decode ms/token | tok/s | of floor | end-to-end tok/s | "
              "vs HF eager |", "|---|---|---:|---:|---:|---:|---:|"]
        for preset, e in R["decode"].items():
            L.append(f"| {preset} | *floor* ({_f(R['models'].get(preset, {}).get('weight_bytes'), '{:.3g}')} B) | "
                     f"{_f(e.get('floor_ms_per_token'), '{:.3f}')} | "
                     f"{_f(e.get('floor_tok_s'), '{:.0f}')} | 1.00 | | |")
            hf = e["systems"].get("hf_eager", {}).get("tok_s")
            for key, label in SYSTEMS.items():
                r = e["systems"].get(key)
                if r is None:
                    continue
                if "error" in r or "skipped" in r:
                    what = ("error: " + short_err(r["error"])) if "error" in r \
                        else "skipped: " + short_err(r["skipped"])
                    L.append(f"| {preset} | {label} | {what} | | | | |")
                    continue
                L.append(f"| {preset} | {label} | {_f(r['decode_ms_per_token'], '{:.3f}')} | "
                         f"{_f(r['tok_s'], '{:.1f}')} | {_f(r['frac_of_floor'])} | "
                         f"{_f(r.get('e2e_tok_s'), '{:.1f}')} | "
                         f"{_f(r['tok_s'] / hf if hf else None, X2)} |")
        L.append("")
    if R["wsd"]:
        L += ["## WSD (forced switch point k, ignore EOS)", ""]
        for key, e in R["wsd"].items():
            if key == "checkpoints":
                continue
            L += [f"### {key}", "",
                  f"prompt {e.get('prompt_len')} random ids (same for both), response "
                  f"{e.get('response')}, chunk {e.get('chunk')}; floors: pilot "
                  f"{_f(e.get('pilot_floor_ms'), '{:.3f}')} ms, base "
                  f"{_f(e.get('base_floor_ms'), '{:.3f}')} ms per step. Ideal = both prefills "
                  "+ k pilot steps + ceil(k/chunk) scoring chunks + (response - k) base steps, "
                  "each one weight read at its floor. Expected: WSD faster than base-only "
                  "for k >= 64 (the pilot's steps are cheaper than the base's).", "",
                  "| run | k kept | total s | pilot prefill | base prefill | drafting | "
                  "scoring | continuation | ideal s | measured / ideal | vs base-only |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in e.get("runs", []):
                if "total_s" not in r:
                    L.append(f"| {r.get('label')} | error: {short_err(r.get('error', '?'))} "
                             "| | | | | | | | | |")
                    continue
                t = r["timings"]
                L.append(f"| {r['label']} | {r['switch_index']} | {r['total_s']:.3f} | "
                         + " | ".join(f"{t[p]:.3f}" for p in PHASES)
                         + f" | {r['ideal_s']:.3f} | {r['measured_over_ideal']:.2f} | "
                         f"{_f(r.get('speedup_vs_base_only'), X2)} |")
            bo = e.get("base_only")
            if bo and "total_s" in bo:
                L.append(f"| base-only (this engine) | \u2014 | {bo['total_s']:.3f} | | | | | | "
                         f"{bo['ideal_s']:.3f} | {bo['measured_over_ideal']:.2f} | 1.00\u00d7 |")
            elif bo:
                L.append(f"| base-only | error: {short_err(bo.get('error', '?'))} | | | | | | | | | |")
            ref = e.get("reference", {})
            if "skipped" in ref:
                L.append(f"\nreference: skipped \u2014 {ref['skipped']}")
            L.append("")
        ck = R["wsd"].get("checkpoints")
        if ck:
            L += ["### checkpoints (the real rule) \u2014 engine vs reference", "",
                  f"pilot `{ck['pilot']}`, base `{ck['base']}`, prompt {ck['prompt']!r}, "
                  f"{ck.get('params')}", "",
                  "| system | total s | k | tokens | note |", "|---|---:|---:|---:|---|"]
            for name, r in (("wsd_engine", ck.get("engine")), ("reference", ck.get("reference"))):
                if not r:
                    continue
                if "error" in r:
                    L.append(f"| {name} | error: {short_err(r['error'])} | | | |")
                    continue
                note = ""
                if name == "wsd_engine":
                    note = f"measured / ideal {r['measured_over_ideal']:.2f}"
                else:
                    note = (f"{r.get('note', '')}; engine {_f(r.get('speedup_of_engine'))}\u00d7 "
                            f"faster; identical output: {r.get('identical')}")
                L.append(f"| {name} | {r['total_s']:.3f} | {r['switch_index']} | "
                         f"{r['n_tokens']} | {note} |")
            L.append("")
    if R["kernels"]:
        L += ["## Kernels", ""]
        for name, k in R["kernels"].items():
            if "result" not in k:
                L += [f"### {name}: error: {short_err(k.get('error', '?'))}", ""]
                continue
            res = k["result"]
            rows = res.get("results") or res.get("rows") or []
            cb = res.get("copy_gbps")
            L += [f"### {name}" + (f" (copy BW {cb:.0f} GB/s)" if cb else ""), "",
                  "| case | impl | \u00b5s | of copy BW |", "|---|---|---:|---:|"]
            for r in rows:
                case = r.get("case") or " ".join(f"{x}={r[x]}" for x in ("op", "ctx", "L")
                                                 if x in r)
                us = r.get("us") if r.get("us") is not None else (
                    r["ms"] * 1e3 if r.get("ms") is not None else None)
                fc = r.get("frac_copy")
                if fc is None and r.get("gbps") is not None and cb:
                    fc = r["gbps"] / cb
                L.append(f"| {case} | {r.get('impl')} | {_f(us, '{:.1f}')} | "
                         f"{_f(fc * 100 if fc is not None else None, '{:.1f}%')} |")
            L.append("")
    if R["skipped"]:
        L += ["## Skipped", ""] + [f"- {s['task']}: {s['reason']}" for s in R["skipped"]] + [""]
    if R["errors"]:
        L += ["## Errors", ""] + [f"- {e_['task']}: {short_err(e_['error'], 300)}"
                                  for e_ in R["errors"]] + [""]
    L.append(f"Run time {R.get('elapsed_s', 0):.0f} s.")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------- entry point

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                 description="wsd_engine end-to-end benchmarks (DESIGN §5)")
    ap.add_argument("--suite", default=",".join(SUITES),
                    help="comma list of kernels, decode, wsd (default: all)")
    ap.add_argument("--preset", nargs="+", default=None,
                    help=f"decode presets, most important first (default: {' '.join(PRESET_ORDER)})")
    ap.add_argument("--pilot", help="pilot checkpoint folder (adds engine vs reference)")
    ap.add_argument("--base", help="base checkpoint folder (adds engine vs reference)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes, torch backend, CPU (automatic without CUDA)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; no new measurement starts after this")
    ap.add_argument("--steps", type=int, default=None, help="decode tokens (default 128; smoke 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (smoke 16)")
    ap.add_argument("--response", type=int, default=None, help="WSD response (default 512; smoke 24)")
    ap.add_argument("--ks", default=None,
                    help="forced switch points, 0 = never (default 8,64,256,0; smoke 4,8,0)")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median; default 3, smoke 2)")
    ap.add_argument("--worker-timeout", type=float, default=300.0,
                    help="seconds a child-process baseline (HF compile, reference) may take "
                         "(default 300; also capped by the time budget left)")
    ap.add_argument("--no-hf-compile", action="store_true",
                    help="skip the HF static cache + torch.compile baseline (minutes each)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(argv)
    a.notes = []
    a.out = os.path.abspath(a.out)              # child processes run in the repository root
    if a.worker:
        return a
    if not a.cpu_smoke and not torch.cuda.is_available():
        a.cpu_smoke = True
        a.notes.append("no CUDA device: ran the CPU smoke (tiny shapes; timings are not "
                       "meaningful)")
    smoke = a.cpu_smoke
    a.suites = [s.strip() for s in a.suite.split(",") if s.strip()]
    bad = [s for s in a.suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    from wsd_engine.config import PRESETS
    presets = [p for x in (a.preset or PRESET_ORDER) for p in x.split(",") if p]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        ap.error(f"unknown preset(s) {bad}; choose from {', '.join(PRESETS)}")
    a.presets = presets
    a.steps = a.steps or (8 if smoke else 128)
    a.prompt_len = a.prompt_len or (16 if smoke else 128)
    a.response = a.response or (24 if smoke else 512)
    a.reps = a.reps or (2 if smoke else 3)
    ks = a.ks or ("4,8,0" if smoke else "8,64,256,0")
    a.ks = [int(k) for k in ks.split(",") if k.strip()]
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    if any(k < 0 or k > a.response for k in a.ks):
        ap.error(f"--ks must lie in [0, --response={a.response}]")
    if bool(a.pilot) != bool(a.base):
        ap.error("give both --pilot and --base (or neither)")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.worker:
        with open(a.worker) as f:
            return worker_main(json.load(f))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cpu_smoke:
        # the Triton interpreter must be chosen before any kernel module is imported
        if "wsd_engine.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            a.notes.append("wsd_engine.kernels was imported before TRITON_INTERPRET=1: "
                           "the kernels suite may fail on CPU")
        os.environ["TRITON_INTERPRET"] = "1"
    how = ensure_kernels_importable()
    if how != "installed":
        a.notes.append(f"wsd_engine.kernels: {how}")
    os.makedirs(a.out, exist_ok=True)
    b = Bench(a)
    print(f"wsd_engine benchmarks on {b.R['meta']['device']}; out: {os.path.abspath(a.out)}"
          + (" [CPU smoke]" if b.smoke else ""), flush=True)
    for n in a.notes:
        print(f"note: {n}", flush=True)
    b.save()
    try:
        b.run_tasks(build_tasks(b))
    finally:
        if not a.no_plots:
            try:
                from benchmarks.plots import make_plots
                msgs = make_plots(b.R, a.out)
            except Exception as e:  # noqa: BLE001 - plots are optional
                msgs = [f"plots failed: {type(e).__name__}: {e}"]
            b.R["plots"] = msgs
            for msg in msgs:
                print(msg, flush=True)
        b.save()
    print()
    print(render_md(b.R), flush=True)
    print(f"wrote {os.path.join(a.out, 'results.json')} and results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
