"""Baselines measured next to wsd_engine in benchmarks/run.py: HF transformers greedy
`generate` (eager, or static cache + torch.compile), and the child process that runs the
compiled baseline or the `wsd_engine.reference` oracle (`python -m benchmarks.run --worker
SPEC.json`), so a crash, a hang or a poisoned CUDA context stays out of the run.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import REPO, err_text, free_memory, model_cfg, sync, timed


# ------------------------------------------------------------------------- HF transformers

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
            dev = torch.device(spec.get("device", "cpu"))
            dtype = getattr(torch, spec.get("dtype", "float32"))
            ref = ReferenceWSD(spec["pilot"], spec["base"], device=dev, dtype=dtype)
            load_s = time.perf_counter() - t0
            s, r = timed(lambda: ref.generate(spec["prompt"], window=spec["window"],
                                              threshold=spec["threshold"],
                                              draft_max_tokens=spec["draft_max_tokens"],
                                              max_new_tokens=spec["max_new_tokens"]), dev)
            res = {"total_s": s, "load_s": load_s, "switch_index": r.switch_index,
                   "switched": r.switched, "n_tokens": len(r.token_ids),
                   "draft_tokens": len(r.draft_ids), "token_ids": r.token_ids,
                   "finish_reason": r.finish_reason,
                   "timings": r.timings,
                   "note": f"transformers, {spec.get('dtype', 'float32')}, {dev}"}
        else:
            raise ValueError(f"unknown worker kind {spec['kind']!r}")
    except BaseException as e:  # noqa: BLE001 - report to the parent
        res = {"error": err_text(e)}
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


def run_worker(spec: dict, timeout: float, log_path: str, log) -> dict:
    """Run worker_main(spec) in a child process (`python -m benchmarks.run --worker`), its
    output in log_path; returns its result, or {"error": ...} on a crash or timeout."""
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
