"""The `tp` suite of benchmarks/run.py: tensor-parallel decode and WSD on a split base.

    python -m benchmarks.run --suite tp                          # >= 2 CUDA devices
    python -m benchmarks.run --suite tp --tp-sizes 2,4 --tp-presets llama3.1-70b
    python -m benchmarks.run --suite tp --cpu-smoke              # tiny shapes, gloo, < 30 s

GPU (NCCL: one GPU per rank, so it needs >= 2 CUDA devices; on a 1-GPU machine it records
"skipped: NCCL tensor parallelism needs one GPU per rank; this machine has 1"): for each
`--tp-presets` preset (llama3.1-70b) and each N in `--tp-sizes` (2, 4, 8; those above the
device count are skipped and say so), random bf16 weights split over N ranks
(`random_model(..., tensor_parallel=N)`, triton backend), batch-1 decode latency per token
(`Model.generate`, (t(n) - t(1)) / (n - 1), median of `--reps`; through the captured
decode graph when `capture_decode` works on the split model, eager otherwise, with the
error kept as a note). Its floor: the bytes one rank reads per token (its weight shards,
as `common.weight_bytes` counts them, plus its KV heads at the mean decoded position) /
the copy bandwidth of one GPU measured first in the same run: the ranks read in parallel,
so the floor of N ranks is about total bytes / (N x bandwidth). Reported as a fraction of
the floor and as a speedup over N = 1 where the whole model fits one device (checked from
the shapes and the free memory first: llama3.1-70b in bf16 is 131 GiB of weights, which
an H200 may or may not hold next to the rest; N = 1 runs last, a failed try is recorded).
Then each `--tp-pairs` pair (llama3.2-3b + llama3.1-70b) at each N in `--tp-wsd-sizes`
(default: the largest N measured): the pilot whole on cuda:0, the base split over N ranks,
WSD at the switch points `--tp-ks` (forced, EOS ignored: the WSD suite's workload) against
base-only decoding of the same `--response` tokens on the same split base.

CPU smoke (`--cpu-smoke`, or no CUDA): the same code paths on tiny shapes (a 4-layer,
256-wide Llama, fp32, torch backend, gloo) with N = 1 and 2: decode tokens/s per N and the
ratio to N = 1; WSD on a tiny pair with the base split in two vs base-only. Random weights
are made per rank, so a split model is not the same model as the whole one: no logits are
compared (tests/test_tensor_parallel.py checks equality on checkpoints). Timings on a
2-core machine measure the command channel and gloo, not a speed-up.

Every split model is closed (its worker processes stopped) in a `finally`.

Results: R["tp"] = {"gpu": {...} | {"skipped": ...}, "cpu": {...} | {"skipped": ...}};
results.md is rendered by report.py (which does not know this suite), so the tp tables are
also written to tp.md in --out and printed.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

from benchmarks.common import free_memory, model_cfg, prompt_ids, timed, weight_bytes

DEFAULT_PRESETS = ("llama3.1-70b",)
DEFAULT_SIZES = (2, 4, 8)
DEFAULT_PAIRS = (("llama3.2-3b", "llama3.1-70b"),)
SMOKE_SIZES = (1, 2)
# the CPU smoke's model: 4 layers, hidden 256, 8 heads / 4 KV heads, ffn 512, vocab 2048
SMOKE_CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                 intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=2048, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, rope_theta=500000.0,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
ONE_GPU = "NCCL tensor parallelism needs one GPU per rank; this machine has {n}"
# room kept free next to the estimate (weights + KV cache + RoPE) before N = 1 is tried:
# the random weights' fp32 temporaries, the fused projections, CUDA context, workspaces
FIT_MARGIN = 6 << 30


def smoke_config():
    from wsd_engine.config import ModelConfig
    return ModelConfig.from_dict(dict(SMOKE_CFG))


# ------------------------------------------------------------------------- skip rules

def gpu_skip_reason(smoke: bool, cuda: bool | None = None, n_gpus: int | None = None):
    """Why the GPU part cannot run here (None: it can). A 1-GPU machine gets the NCCL line
    (one GPU per rank) even under --cpu-smoke: that is what it lacks."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "no CUDA"
    n_gpus = torch.cuda.device_count() if n_gpus is None else n_gpus
    if n_gpus < 2:
        return ONE_GPU.format(n=n_gpus)
    if smoke:
        return "--cpu-smoke"
    return None


def fits_one_device(cfg, dtype, max_seq_len: int, dev) -> dict:
    """Whether the whole model (weights + KV cache + RoPE, `memory.estimate`) plus
    FIT_MARGIN fits the free memory of `dev` (always on CPU)."""
    from wsd_engine.memory import estimate
    need = sum(estimate(cfg, dtype, max_seq_len).values())
    if dev.type != "cuda":
        return {"fits": True, "need_bytes": need}
    free, total = torch.cuda.mem_get_info(dev)
    return {"fits": need + FIT_MARGIN <= free, "need_bytes": need, "margin_bytes": FIT_MARGIN,
            "free_bytes": free, "total_bytes": total}


# ------------------------------------------------------------------------- bytes

def kv_bytes_per_token(model, positions: float) -> float:
    """Bytes of K and V this rank reads for one decode step at `positions` cached tokens
    (its KV heads: the local config of a split model)."""
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize * positions


def total_weight_bytes(cfg, dtype) -> int:
    """weight_bytes() of the whole model, from the shapes (what N ranks read together)."""
    from wsd_engine.loader import expected_shapes
    n = sum(math.prod(shape) for name, shape in expected_shapes(cfg).items()
            if not (name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings))
    return n * dtype.itemsize


def floor_of(model, cfg, n: int, positions: float, bw_gbps: float) -> dict:
    """Per-token floor of a model split over n ranks: rank 0's bytes / one device's copy
    bandwidth (the ranks read their shards in parallel)."""
    wb = weight_bytes(model)                       # rank 0's shards (the whole model at n=1)
    kv = kv_bytes_per_token(model, positions)
    floor_ms = (wb + kv) / (bw_gbps * 1e9) * 1e3
    total = total_weight_bytes(cfg, model.dtype) + kv * n
    return {"weight_bytes_per_rank": wb, "kv_bytes_per_rank": kv, "total_bytes": total,
            "floor_ms_per_token": floor_ms, "floor_tok_s": 1e3 / floor_ms,
            "floor_ms_total_over_n": total / (n * bw_gbps * 1e9) * 1e3,
            "mean_positions": positions}


# ------------------------------------------------------------------------- measurements

def measure_decode(log, cfg, name: str, n: int, dev, dtype, backend: str, prompt_len: int,
                   steps: int, reps: int, bw_gbps: float, graphs: bool) -> dict:
    """Batch-1 decode of a random-weight model split over n ranks (n = 1: whole)."""
    from benchmarks.suite import measure_engine
    from wsd_engine.loading import random_model
    msl = prompt_len + max(steps, 32) + 24
    rec = {"preset": name, "tp": n, "device": str(dev), "dtype": str(dtype),
           "backend": backend, "prompt_len": prompt_len, "steps": steps}
    t0 = time.perf_counter()
    m = random_model(cfg, dev, dtype, max_seq_len=msl, backend=backend, seed=0,
                     tensor_parallel=n)
    try:
        rec["setup_s"] = time.perf_counter() - t0
        rec.update(floor_of(m, cfg, n, prompt_len + steps / 2, bw_gbps))
        ids = prompt_ids(cfg.vocab_size, prompt_len)
        rec["cuda_graph"] = False
        if graphs:
            try:
                m.capture_decode()
                rec["cuda_graph"] = True
            except Exception as e:  # noqa: BLE001 - eager then, and say why
                rec["note"] = (f"capture_decode failed on the split model, eager decode: "
                               f"{type(e).__name__}: {str(e)[:300]}")
                log(f"    {name} tp={n}: {rec['note']}")
                try:
                    m.clear_graphs()
                except Exception:  # noqa: BLE001
                    pass
        rec.update(measure_engine(m, ids, steps, rec["floor_ms_per_token"], reps, dev))
        log(f"    {name} tp={n}: {rec['decode_ms_per_token']:.3f} ms/token "
            f"({rec['tok_s']:.0f} tok/s, {rec['frac_of_floor']:.0%} of its floor "
            f"{rec['floor_ms_per_token']:.3f} ms; {'graph' if rec['cuda_graph'] else 'eager'})")
        return rec
    finally:
        m.close()
        m = None
        free_memory(dev)


def measure_wsd(log, pc, bc, key: str, n: int, dev, dtype, backend: str, prompt_len: int,
                response: int, chunk: int, ks, reps: int, graphs: bool) -> dict:
    """WSD with the pilot whole and the base split over n ranks, at forced switch points,
    against base-only decoding of the same response on the same split base."""
    from wsd_engine.engine import WSD, WSDParams
    from wsd_engine.loading import random_model
    msl = prompt_len + response + 64
    e = {"pair": key, "tp": n, "prompt_len": prompt_len, "response": response, "chunk": chunk,
         "cuda_graphs": graphs, "runs": []}
    pilot = random_model(pc, dev, dtype, max_seq_len=msl, backend=backend, seed=0)
    base = None
    try:
        base = random_model(bc, dev, dtype, max_seq_len=msl, backend=backend, seed=1,
                            tensor_parallel=n)
        ids = prompt_ids(min(pc.vocab_size, bc.vocab_size), prompt_len)
        try:
            wsd = WSD(pilot, base, cuda_graphs=graphs)
        except Exception as ex:  # noqa: BLE001 - eager then, and say why
            if not graphs:
                raise
            e["note"] = (f"WSD with CUDA graphs failed on the split base, eager: "
                         f"{type(ex).__name__}: {str(ex)[:300]}")
            log(f"    {key} tp={n}: {e['note']}")
            for m in (pilot, base):
                m.clear_graphs()
            wsd, graphs = WSD(pilot, base, cuda_graphs=False), False
            e["cuda_graphs"] = False
        wsd.generate_ids(ids, ids, WSDParams(draft_max_tokens=min(response, 4 * chunk),
                                             max_new_tokens=min(response, 6 * chunk),
                                             chunk=chunk, force_switch=min(chunk, response),
                                             ignore_eos=True))                 # warm-up
        for k in ks:
            p = WSDParams(draft_max_tokens=response, max_new_tokens=response, chunk=chunk,
                          force_switch=k, ignore_eos=True)
            runs = sorted((wsd.generate_ids(ids, ids, p) for _ in range(reps)),
                          key=lambda r: r.timings["total"])
            r = runs[(len(runs) - 1) // 2]
            if len(r.token_ids) != response:
                raise RuntimeError(f"WSD returned {len(r.token_ids)} tokens, expected {response}")
            e["runs"].append({"k": k, "label": f"k={k}" if k else f"never (k={r.switch_index})",
                              "switch_index": r.switch_index, "switched": r.switched,
                              "total_s": r.timings["total"], "tok_s": response / r.timings["total"],
                              "all_totals_s": [x.timings["total"] for x in runs]})
            log(f"    {key} tp={n}: WSD k={k}: {r.timings['total']:.3f} s")
        wsd = None
        if graphs:           # as a user with CUDA graphs runs base-only: prompt and steps
            from wsd_engine.graphs import PREFILL_BUCKETS
            base.capture_prefill(PREFILL_BUCKETS)
            base.capture_decode()
        base.generate(ids, 2, stop_at_eos=False)                               # warm-up
        walls = [timed(lambda: base.generate(ids, response, stop_at_eos=False), dev)[0]
                 for _ in range(reps)]
        s = statistics.median(walls)
        e["base_only"] = {"total_s": s, "tok_s": response / s, "all_totals_s": walls}
        log(f"    {key} tp={n}: base-only {s:.3f} s")
        for r in e["runs"]:
            r["speedup_vs_base_only"] = s / r["total_s"]
        return e
    finally:
        wsd = None
        if base is not None:
            base.close()
        pilot.close()
        pilot = base = None
        free_memory(dev)


# ------------------------------------------------------------------------- suite tasks

def _entry(b) -> dict:
    return b.R.setdefault("tp", {"gpu": None, "cpu": None})


def _ratios(by_n: dict) -> None:
    one = by_n.get("1", {}).get("tok_s")
    for rec in by_n.values():
        if one and "tok_s" in rec:
            rec["speedup_vs_1"] = rec["tok_s"] / one


def _out_of_time(b, by_n: dict, n: int, task: str) -> bool:
    """The time budget is spent: record rank count n as skipped (and say so)."""
    rem = b.remaining()
    if rem is None or rem > 0:
        return False
    by_n[str(n)] = {"tp": n, "skipped": "time budget spent"}
    b.R["skipped"].append({"task": task, "reason": "time budget spent"})
    return True


def _run_sizes(b, e: dict, presets, sizes, cfg_of, dev, dtype, backend, graphs,
               one_check=None) -> None:
    a = b.a
    for name in presets:
        cfg = cfg_of(name)
        by_n = e["decode"].setdefault(name, {})
        for n in sizes:
            if _out_of_time(b, by_n, n, f"tp decode {name} N={n}"):
                continue
            if n == 1 and one_check is not None:
                fit = one_check(cfg)
                if not fit["fits"]:
                    why = (f"does not fit one device: needs ~{fit['need_bytes'] / 2**30:.1f} "
                           f"GiB + {FIT_MARGIN >> 30} GiB margin, "
                           f"{fit.get('free_bytes', 0) / 2**30:.1f} GiB free")
                    by_n["1"] = {"tp": 1, "skipped": why, "fit": fit}
                    b.R["skipped"].append({"task": f"tp decode {name} N=1", "reason": why})
                    b.log(f"    {name} tp=1: skipped: {why}")
                    continue
            holder: dict = {}
            b.attempt(holder, "run",
                      lambda n=n: measure_decode(b.log, cfg, name, n, dev, dtype, backend,
                                                 a.prompt_len, a.steps, a.reps, b.bw(), graphs),
                      f"tp decode {name} N={n}")
            by_n[str(n)] = holder["run"]
            b.save()
        _ratios(by_n)


def _run_pairs(b, e: dict, pairs, sizes, cfg_of, dev, dtype, backend, graphs) -> None:
    a = b.a
    for pn, bn in pairs:
        key = f"{pn} + {bn}"
        by_n = e["wsd"].setdefault(key, {})
        for n in sizes:
            if _out_of_time(b, by_n, n, f"tp wsd {key} N={n}"):
                continue
            holder: dict = {}
            b.attempt(holder, "run",
                      lambda n=n: measure_wsd(b.log, cfg_of(pn), cfg_of(bn), key, n, dev,
                                              dtype, backend, a.prompt_len, a.response,
                                              a.chunk, a.tp_ks, a.reps, graphs),
                      f"tp wsd {key} N={n}")
            by_n[str(n)] = holder["run"]
            b.save()


def gpu_task(b) -> None:
    a = b.a
    e = _entry(b)
    why = gpu_skip_reason(b.smoke)
    if why is not None:
        e["gpu"] = {"skipped": why}
        b.R["skipped"].append({"task": "tp gpu", "reason": why})
        b.log(f"    tp gpu: skipped: {why}")
        return
    count = torch.cuda.device_count()
    sizes = [n for n in a.tp_sizes if 1 < n <= count]      # N = 1 runs last, where it fits
    g = {"device_count": count, "sizes": sizes, "presets": list(a.tp_presets),
         "pairs": ["+".join(p) for p in a.tp_pairs], "decode": {}, "wsd": {},
         "copy_gbps_one_gpu": b.R.get("copy_gbps"),
         "note": "random bf16 weights, triton backend, one GPU per rank (NCCL); floor = "
                 "rank 0's weight + KV bytes per token / one GPU's copy bandwidth"}
    e["gpu"] = g
    for n in a.tp_sizes:
        if n > count:
            for name in a.tp_presets:
                g["decode"].setdefault(name, {})[str(n)] = {
                    "tp": n, "skipped": f"needs {n} GPUs, this machine has {count}"}
    dev = torch.device("cuda")
    wsd_sizes = [n for n in (a.tp_wsd_sizes or sizes[-1:]) if n <= count]
    try:
        _run_sizes(b, g, a.tp_presets, sizes + [1], lambda p: model_cfg(p, False), dev,
                   torch.bfloat16, "triton", True,
                   one_check=lambda cfg: fits_one_device(
                       cfg, torch.bfloat16, a.prompt_len + max(a.steps, 32) + 24, dev))
        _run_pairs(b, g, a.tp_pairs, wsd_sizes, lambda p: model_cfg(p, False), dev,
                   torch.bfloat16, "triton", True)
    finally:
        _write_md(b)


def cpu_task(b) -> None:
    """The CPU run (gloo, fp32, torch backend) on tiny shapes: the GPU part's code paths."""
    a = b.a
    e = _entry(b)
    c = {"sizes": list(a.tp_cpu_sizes), "threads": torch.get_num_threads(),
         "decode": {}, "wsd": {},
         "note": "tiny random models, fp32, torch backend, gloo; random weights are made per "
                 "rank (a split model is not the whole model of the same seed: no logits "
                 "compared); on few cores the ratios measure the command channel and gloo"}
    e["cpu"] = c
    dev = torch.device("cpu")
    smoke_name = f"tiny (as {a.tp_presets[0]})"

    def cfg_of(p):
        return smoke_config() if p == smoke_name else model_cfg(p, True)
    try:
        _run_sizes(b, c, [smoke_name], list(a.tp_cpu_sizes), cfg_of, dev, torch.float32,
                   "torch", False)
        pairs = [(p, q) for p, q in a.tp_pairs]
        _run_pairs(b, c, pairs, [n for n in a.tp_cpu_sizes if n > 1][-1:], cfg_of, dev,
                   torch.float32, "torch", False)
    finally:
        _write_md(b)


# ------------------------------------------------------------------------- tables

def render_md(tp: dict) -> str:
    lines = ["## Tensor parallelism (tp suite)", ""]
    for part in ("gpu", "cpu"):
        e = tp.get(part)
        if e is None:
            continue
        lines.append(f"### {part.upper()}" + (" (tiny shapes, gloo)" if part == "cpu" else ""))
        lines.append("")
        if "skipped" in e:
            lines += [f"skipped: {e['skipped']}", ""]
            continue
        if e.get("note"):
            lines += [e["note"], ""]
        lines += ["| model | N | ms/token | tok/s | floor ms | of floor | speed-up vs N=1 | "
                  "graph | note |", "|---|---|---|---|---|---|---|---|---|"]
        for name, by_n in e.get("decode", {}).items():
            for n, r in sorted(by_n.items(), key=lambda x: int(x[0])):
                if "decode_ms_per_token" not in r:
                    why = r.get("skipped") or (r.get("error") or "").splitlines()[0][:120]
                    lines.append(f"| {name} | {n} | - | - | - | - | - | - | "
                                 f"{why.replace('|', '/')} |")
                    continue
                sp = r.get("speedup_vs_1")
                lines.append(f"| {name} | {n} | {r['decode_ms_per_token']:.3f} | "
                             f"{r['tok_s']:.0f} | {r['floor_ms_per_token']:.3f} | "
                             f"{r['frac_of_floor']:.0%} | "
                             f"{f'{sp:.2f}x' if sp else '-'} | "
                             f"{'yes' if r.get('cuda_graph') else 'no'} | "
                             f"{(r.get('note') or '')[:80].replace('|', '/')} |")
        lines.append("")
        if e.get("wsd"):
            lines += ["| pair | N | run | total s | tok/s | vs base-only |",
                      "|---|---|---|---|---|---|"]
            for key, by_n in e["wsd"].items():
                for n, r in sorted(by_n.items(), key=lambda x: int(x[0])):
                    if "runs" not in r:
                        why = r.get("skipped") or (r.get("error") or "").splitlines()[0][:120]
                        lines.append(f"| {key} | {n} | - | - | - | {why.replace('|', '/')} |")
                        continue
                    bo = r.get("base_only")
                    if bo:
                        lines.append(f"| {key} | {n} | base-only | {bo['total_s']:.3f} | "
                                     f"{bo['tok_s']:.0f} | 1.00x |")
                    for x in r["runs"]:
                        sp = x.get("speedup_vs_base_only")
                        lines.append(f"| {key} | {n} | WSD {x['label']} | {x['total_s']:.3f} | "
                                     f"{x['tok_s']:.0f} | {f'{sp:.2f}x' if sp else '-'} |")
            lines.append("")
    return "\n".join(lines)


def _write_md(b) -> None:
    md = render_md(b.R.get("tp", {}))
    with open(os.path.join(b.a.out, "tp.md"), "w") as f:
        f.write(md + "\n")
    b.save()
