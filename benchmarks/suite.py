"""The steps of benchmarks/run.py: `Bench` runs a list of (name, step) tasks under the time
budget, records every result or failure in one dict (rewritten as results.json / results.md
after each step), and has one method per measurement: copy bandwidth, decode (this engine,
HF eager, HF compile), WSD on a random-weight pair, the checkpoint pair against the
reference oracle, and each kernel benchmark.
"""
from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from benchmarks.baselines import measure_hf, run_worker
from benchmarks.bench_switch_score import copy_bandwidth_gbps
from benchmarks.common import (attempt, err_text, free_memory, model_cfg, prompt_ids,
                               short_err, timed, versions, weight_bytes)
from benchmarks.report import PHASES, SYSTEMS, render_md

CKPT_PROMPT = "Explain, step by step, how a refrigerator keeps food cold."


def measure_engine(model, ids: list[int], n: int, floor_ms: float, reps: int, dev) -> dict:
    """Greedy `Model.generate` of n tokens after the prompt (one step in flight while the
    host reads each token). Per-token decode time = (t(n) - t(1)) / (n - 1): prefill and
    first token cancel out."""
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


def measure_prefill(model, ids: list[int], floor_ms: float, reps: int, dev) -> dict:
    """Prefill of the prompt into an empty cache (logits of the last token), against one
    weight read at the copy bandwidth. Target (issue 5): the 8B at 128 tokens <= 1.5x."""
    t = torch.tensor(ids, device=dev)

    def once():
        model.cache.reset()
        return model.prefill(t)
    once()                                                              # warm-up
    ms = statistics.median(timed(once, dev)[0] for _ in range(max(reps, 3))) * 1e3
    return {"prompt_len": len(ids), "ms": ms, "over_floor": ms / floor_ms,
            "prompt_tok_s": len(ids) / ms * 1e3, "reps": max(reps, 3),
            "method": "Model.prefill after cache.reset(), median"}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        return f"{torch.cuda.get_device_name()} ({gib:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------- the bench

class Bench:
    """One run of the suite: settings `a` (run.parse_args), results `R` (results.json)."""

    def __init__(self, a):
        self.a = a
        self.t0 = time.perf_counter()
        self.smoke = a.cpu_smoke
        self.dev = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.backend = "torch" if self.smoke else "triton"
        self.graphs = not self.smoke
        # the WSD runs' one-token kernels (triton backend only; the CPU smoke runs torch)
        on = not self.smoke
        # (None = the engine's default; the flags turn them on)
        self.decode_kernels = {k: True if getattr(a, k, False) and on else None
                               for k in ("fused_gemv", "pdl")}
        # neither flag: the engine times the choices on the GPU and keeps the fastest per
        # model (WSD tune_kernels=None), unless --no-tune
        self.decode_kernels["tune_kernels"] = False if getattr(a, "no_tune", False) else None
        os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
        self.R = {
            "meta": {"device": device_name(self.dev), "versions": versions(),
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "argv": a.argv, "cpu_smoke": self.smoke,
                     "dtype": str(self.dtype), "backend": self.backend,
                     "cuda_graphs": self.graphs, "notes": list(a.notes),
                     "settings": {"prompt_len": a.prompt_len, "decode_steps": a.steps,
                                  "response": a.response, "ks": a.ks, "chunk": a.chunk,
                                  "pairs": ["+".join(p) for p in a.pairs], "ref_k": a.ref_k, "reference": not a.no_reference,
                                  "reps": a.reps, "presets": a.presets, "suites": a.suites,
                                  "time_budget_s": a.time_budget,
                                  "wsd_fused_gemv": bool(self.decode_kernels["fused_gemv"]),
                                  "wsd_pdl": bool(self.decode_kernels["pdl"]),
                                  "wsd_tune_kernels": not getattr(a, "no_tune", False)}},
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

    def worker_timeout(self) -> float:
        """--worker-timeout, capped by the time budget left (but at least 30 s)."""
        timeout = self.a.worker_timeout
        rem = self.remaining()
        if rem is not None:
            timeout = max(30.0, min(timeout, rem))
        return timeout

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

    def _decode_entry(self, preset: str) -> dict:
        return self.R["decode"].setdefault(preset, {"systems": {}})

    def decode_engine(self, preset: str) -> None:
        from wsd_engine.loading import build_model, random_model
        a, dev = self.a, self.dev
        cfg = model_cfg(preset, self.smoke)
        e = self._decode_entry(preset)
        # room for generate (steps), with the slack the prefill buckets had before
        msl = a.prompt_len + max(a.steps, 32) + 24
        m = random_model(cfg, dev, self.dtype, max_seq_len=msl, backend=self.backend, seed=0)
        floor_ms = self._floor(preset, m)
        e.update(floor_ms_per_token=floor_ms, floor_tok_s=1e3 / floor_ms)
        ids = prompt_ids(cfg.vocab_size, a.prompt_len)
        self.log(f"    {preset}: prefill of {a.prompt_len} tokens ({self.backend}, eager)")
        self.attempt(e, "prefill", lambda: measure_prefill(m, ids, floor_ms, a.reps, dev),
                     f"prefill {preset}")
        sysd = e["systems"]
        if self.graphs:
            self.log(f"    {preset}: {SYSTEMS['engine_graph']}")

            def graph():
                m.capture_decode()
                return measure_engine(m, ids, a.steps, floor_ms, a.reps, dev)
            self.attempt(sysd, "engine_graph", graph, f"decode {preset} engine_graph")
            self.log(f"    {preset}: prefill of {a.prompt_len} tokens through a captured "
                     "bucket graph")

            def prefill_graph():
                from wsd_engine.graphs import PREFILL_BUCKETS
                m.capture_prefill(PREFILL_BUCKETS)
                return dict(measure_prefill(m, ids, floor_ms, a.reps, dev),
                            buckets=list(PREFILL_BUCKETS),
                            method="Model.prefill through the smallest captured bucket "
                                   "graph that holds the prompt (padded), median")
            self.attempt(e, "prefill_graph", prefill_graph, f"prefill {preset} graph")
            self.log(f"    {preset}: {SYSTEMS['engine_graph_tuned']}")

            def tuned():
                # what an engine with CUDA graphs does by default: time the one-token
                # kernel settings on this card, keep the fastest, decode through it
                from wsd_engine.tuning import tune_decode_kernels
                m.clear_graphs()
                try:
                    rec = tune_decode_kernels(m)
                    m.capture_decode()
                    return dict(measure_engine(m, ids, a.steps, floor_ms, a.reps, dev),
                                tuning=rec)
                finally:
                    m.clear_graphs()
                    m.set_decode_kernels(fused_gemv=False, pdl=False)
            self.attempt(sysd, "engine_graph_tuned", tuned, f"decode {preset} engine_graph_tuned")
            m.clear_graphs()
            tm = build_model(cfg, m.weights, dev, self.dtype, msl, backend="torch")
        else:
            tm = m
            for key in ("engine_graph", "engine_graph_tuned"):
                sysd[key] = {"skipped": "CPU smoke: no CUDA graphs (torch backend only)"}
        if a.no_torch_eager and not self.smoke:
            sysd["engine_torch_eager"] = {"skipped": "--no-torch-eager"}
        else:
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
            e["systems"]["hf_compile"] = {"skipped": "CPU smoke: left out for time (it "
                                          "compiles for 20-30 s per model; a CPU test runs it)"
                                          if self.smoke else "--no-hf-compile"}
            return
        cfg = model_cfg(preset, self.smoke)
        floor_ms = self.floors.get(preset) or self._floor_from_cfg(preset, cfg)
        ids = prompt_ids(cfg.vocab_size, a.prompt_len)
        self.log(f"    {preset}: {SYSTEMS['hf_compile']}")
        timeout = self.worker_timeout()
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

    def wsd_pair(self, pilot_name: str, base_name: str) -> None:
        from wsd_engine.engine import WSD, WSDParams
        from wsd_engine.loading import random_model
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
        wsd = WSD(pilot, base, cuda_graphs=self.graphs, **self.decode_kernels)
        e["kernel_tuning"] = wsd.kernel_tuning    # per model: each setting's step ms, chosen
        e["decode_kernels"] = {n: dict(fused_gemv=bool(getattr(m.ops, "fused_gemv", False)),
                                       pdl=bool(getattr(m.ops, "pdl", False)))
                               for n, m in (("pilot", pilot), ("base", base))}
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
            if self.graphs:   # as a user with CUDA graphs runs it: prompt and steps in graphs
                from wsd_engine.graphs import PREFILL_BUCKETS
                base.capture_prefill(PREFILL_BUCKETS)
                base.capture_decode()
            base.generate(ids, 2, stop_at_eos=False)                    # warm-up
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
        wsd = pilot = base = None
        free_memory(dev)
        if a.no_reference:
            e["reference"] = {"skipped": "--no-reference"}
            return
        self.log(f"    {key}: wsd_engine.reference (HF transformers, three offline stages, "
                 f"same device), switch forced at {a.ref_k or 'never'}")
        ref = self.attempt(e, "reference", lambda: self._reference(pc, bc, ids, a.ref_k),
                           f"wsd {key} reference")
        mine = next((r for r in e["runs"] if r.get("k") == a.ref_k and "total_s" in r), None)
        if ref and mine:
            ref["speedup_of_engine"] = ref["total_s"] / mine["total_s"]
            ref["engine_total_s"] = mine["total_s"]

    def _reference(self, pc, bc, ids: list[int], k: int) -> dict:
        """wsd_engine.reference on random-weight HF models of the pair's shapes on this
        device and dtype (token level, forced k, EOS ignored: the engine's workload)."""
        from transformers import AutoModelForCausalLM

        from benchmarks.baselines import hf_config
        from wsd_engine.reference import ReferenceWSD
        a, dev = self.a, self.dev
        models = []
        for cfg in (pc, bc):
            with torch.device(dev):
                models.append(AutoModelForCausalLM.from_config(hf_config(cfg),
                                                               dtype=self.dtype).to(dev))
        ref = ReferenceWSD.from_models(*models)
        R_ = a.response
        kw = dict(draft_max_tokens=R_, max_new_tokens=R_, force_switch=k, ignore_eos=True)
        ref.generate_ids(ids, ids, **dict(kw, draft_max_tokens=min(R_, 8),
                                          max_new_tokens=min(R_, 16),
                                          force_switch=min(k, 8)))            # warm-up
        r = ref.generate_ids(ids, ids, **kw)
        if len(r.token_ids) != R_:
            raise RuntimeError(f"reference returned {len(r.token_ids)} tokens, expected {R_}")
        models = ref = None
        return {"k": k, "switch_index": r.switch_index, "total_s": r.timings["total"],
                "timings": r.timings, "draft_tokens": len(r.draft_ids), "reps": 1,
                "note": "HF transformers eager generate (stage 1 drafts the whole response), "
                        "one forward (stage 2), generate (stage 3); same device and dtype"}

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
                                      **self.decode_kernels)
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
        self.log("    checkpoints: wsd_engine.reference (transformers oracle, same device)")
        timeout = self.worker_timeout()
        ref = run_worker(dict(kind="reference", pilot=a.pilot, base=a.base, prompt=CKPT_PROMPT,
                              device=str(dev), dtype="float32" if self.smoke else "bfloat16",
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

