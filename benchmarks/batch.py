"""The `batch` suite of benchmarks/run.py: many WSD requests in one engine.

CPU (torch backend, `--batch-threads` threads, fp32), per pair (`--batch-cpu-pairs`: the demo
pair and a pair of ~30M-parameter synthetic models with a ~10M pilot, random weights
made in a temporary folder): the same `--batch-requests` requests (8; switch forced at
points spread over `--batch-cpu-ks`, EOS ignored, no stop strings) run together
(`WSD.generate` of the list) and one after another (`WSD.generate` per prompt) on the same
engine, side by side in each repetition: output-token throughput, the ratio, and whether
the outputs are token-identical. Then throughput at each of `--batch-cpu-sizes` as a ratio
to batch 1, the same requests two ways: in groups of b (`generate` of b prompts, then the
next b: rows start together, so their phases line up) and with at most b running at a
time (the request-level API: `add_request` whenever fewer than b run, `step()`: a row
that finishes is replaced at once, so drafting and continuing rows mix). Batch 1 is the
one-after-another run, batch = all requests the together run.

GPU (CUDA only; "skipped: no CUDA" otherwise): random bf16 weights of the first
`--pairs` pair (llama3.2-1b + llama3.1-8b by default), triton backend, `--prompt-len`-token
prompts (128), `--response`-token answers (512), switch points spread over `--batch-gpu-ks`
(8..256): b requests together for each b in `--batch-gpu-sizes` (1, 4, 16, 32;
throughput as a ratio to batch 1), then `--batch-gpu-prompts` (64) prompts through the
engine (at most max(sizes) at a time) against `wsd_engine.reference` (the paper's three
offline stages on HF transformers), which runs one prompt at a time: it is timed on
`--batch-ref-prompts` of them and the 64-prompt time extrapolated (it says so).

Results: R["batch"] = {"cpu": {pair: ...}, "gpu": {...} | {"skipped": ...}}.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import free_memory, model_cfg, prompt_ids, timed

# pilot / base shapes of the CPU pairs (transformers config fields); "demo" is the
# built-in demo pair (`make_demo_pair`), "tiny" a fast stand-in for the tests
CPU_PAIRS = {
    "demo": None,
    "30m": (dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=2),
            dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                 num_attention_heads=8, num_key_value_heads=2)),
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)),
}
CPU_PROMPT = "Tell me something about item number {i}, please."


def spread(lo: int, hi: int, n: int) -> list[int]:
    """n switch points evenly over [lo, hi] (one: the middle)."""
    if n == 1:
        return [(lo + hi) // 2]
    return [lo + round(i * (hi - lo) / (n - 1)) for i in range(n)]


def n_params(model) -> int:
    return sum(t.numel() for t in model.weights.values())


def build_cpu_pair(name: str, root: str) -> tuple[str, str]:
    """Checkpoint folders (pilot, base) of a CPU pair, made in `root` (no downloads)."""
    from wsd_engine.synthetic import bigram_transform, make_demo_pair, make_model, make_tokenizer
    if name not in CPU_PAIRS:
        raise ValueError(f"unknown CPU pair {name!r}; choose from {', '.join(CPU_PAIRS)}")
    if CPU_PAIRS[name] is None:
        return make_demo_pair(root)
    pilot_kw, base_kw = CPU_PAIRS[name]
    tok = make_tokenizer(320)
    base = make_model(os.path.join(root, "base"), seed=0, tokenizer=tok, init_scale=5.0,
                      transform=bigram_transform(0.3, 100.0), **base_kw)
    pilot = make_model(os.path.join(root, "pilot"), seed=1, tokenizer=tok, init_scale=5.0,
                       transform=bigram_transform(0.3, 100.0), **pilot_kw)
    return pilot, base


def run_capped(wsd, prompts, params, cap: int):
    """The requests through the request-level API with at most `cap` running at a time:
    a new one is added whenever fewer run (it joins the next step). Results in order."""
    pending = list(range(len(prompts)))
    results = {}
    while pending or wsd.has_unfinished_requests():
        while pending and wsd.num_running + wsd.num_waiting < cap:
            i = pending.pop(0)
            wsd.add_request(("bench", i), prompts[i], params[i])
        for out in wsd.step():
            if out.finished:
                if out.result is None:
                    raise RuntimeError(f"request {out.request_id} ended with "
                                       f"{out.finish_reason}: {out.error!r}")
                results[out.request_id[1]] = out.result
    return [results[i] for i in range(len(prompts))]


def compare(ref: list, other: list) -> dict:
    """Token-level comparison of two runs of the same requests."""
    diff = []
    for i, (x, y) in enumerate(zip(ref, other)):
        if x.token_ids != y.token_ids:
            at = next((j for j, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q),
                      min(len(x.token_ids), len(y.token_ids)))
            diff.append({"request": i, "first_diff_at": at, "switch_index": [x.switch_index,
                                                                              y.switch_index]})
    return {"identical": not diff and len(ref) == len(other), "n_identical": len(ref) - len(diff),
            "n": len(ref), "differences": diff}


def _tokens(results) -> int:
    return sum(len(r.token_ids) for r in results)


# ------------------------------------------------------------------------- CPU

def measure_cpu_pair(name: str, log, reps: int, n_req: int, max_new: int, draft: int,
                     ks: tuple[int, int], sizes, threads: int, chunk: int = 8) -> dict:
    """One CPU pair: n_req requests together vs one after another (same engine, same
    params, interleaved in each repetition), then at most b at a time for each b in sizes.
    Throughputs are medians over `reps`; every run's outputs are compared with the
    one-after-another run's."""
    from wsd_engine.engine import WSD, WSDParams
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            pilot_dir, base_dir = build_cpu_pair(name, root)
            build_s = time.perf_counter() - t0
            slots = max([n_req] + [b for b in sizes if b <= n_req])
            wsd = WSD.from_pretrained(pilot_dir, base_dir, max_batch_size=slots)
            k_list = spread(ks[0], ks[1], n_req)
            params = [WSDParams(max_new_tokens=max_new, draft_max_tokens=draft, chunk=chunk,
                                force_switch=k, ignore_eos=True, stop=()) for k in k_list]
            prompts = [CPU_PROMPT.format(i=i) for i in range(n_req)]
            e = {"pair": name, "pilot_params": n_params(wsd.pilot),
                 "base_params": n_params(wsd.base),
                 "pilot_shape": _shape(wsd.pilot), "base_shape": _shape(wsd.base),
                 "dtype": str(wsd.base.dtype), "backend": wsd.base.backend,
                 "threads": threads, "requests": n_req, "max_new_tokens": max_new,
                 "draft_max_tokens": draft, "chunk": chunk, "switch_points": k_list,
                 "reps": reps, "build_s": build_s,
                 "method": "batched: WSD.generate(list of the prompts); sequential: "
                           "WSD.generate per prompt, same engine and params; by_size: groups "
                           "of b prompts per WSD.generate; by_size_capped: add_request "
                           "whenever fewer than b run + step(); medians over reps"}
            log(f"    {name}: pilot {e['pilot_params'] / 1e6:.1f}M, base "
                f"{e['base_params'] / 1e6:.1f}M params, {threads} thread(s); {n_req} requests "
                f"of {max_new} tokens, switch at {k_list}")
            wsd.generate(prompts[:2], params[:2])                           # warm-up
            wsd.generate(prompts[0], params[0])
            times = {"batched": [], "sequential": []}
            caps = [b for b in sizes if 1 < b < n_req]
            for b in caps:
                times[("groups", b)], times[("capped", b)] = [], []
            cmp_ = {}
            seq = None
            for rep in range(reps):
                tb, batched = timed(lambda: wsd.generate(prompts, params), wsd.base.device)
                ts, seq_r = timed(lambda: [wsd.generate(p, q) for p, q in zip(prompts, params)],
                                  wsd.base.device)
                seq = seq if seq is not None else seq_r
                times["batched"].append(tb)
                times["sequential"].append(ts)
                cmp_.setdefault("batched", compare(seq, batched))
                if rep:
                    cmp_.setdefault("sequential_repeat", compare(seq, seq_r))
                line = f"    {name} rep {rep + 1}/{reps}: {n_req} together {tb:.2f} s, one " \
                       f"after another {ts:.2f} s ({ts / tb:.2f}x)"
                for b in caps:
                    tg, grouped = timed(lambda b=b: [r for i in range(0, n_req, b) for r in
                                                     wsd.generate(prompts[i:i + b],
                                                                  params[i:i + b])],
                                        wsd.base.device)
                    tc, capped = timed(lambda b=b: run_capped(wsd, prompts, params, b),
                                       wsd.base.device)
                    times[("groups", b)].append(tg)
                    times[("capped", b)].append(tc)
                    cmp_.setdefault(f"groups_of_{b}", compare(seq, grouped))
                    cmp_.setdefault(f"at_most_{b}", compare(seq, capped))
                    line += f"; b={b}: groups {tg:.2f} s, at most b running {tc:.2f} s"
                log(line)
            tokens = _tokens(seq)
            tb, ts = statistics.median(times["batched"]), statistics.median(times["sequential"])
            e.update(output_tokens=tokens, batched_s=tb, sequential_s=ts,
                     batched_tok_s=tokens / tb, sequential_tok_s=tokens / ts,
                     ratio=ts / tb, all_batched_s=times["batched"],
                     all_sequential_s=times["sequential"], comparisons=cmp_,
                     identical=all(c["identical"] for c in cmp_.values()),
                     meets_4x=ts / tb >= 4.0)
            for key, how in (("by_size", "groups"), ("by_size_capped", "capped")):
                by_size = {}
                for b in sizes:
                    if b == 1:
                        s = ts
                    elif b >= n_req:
                        s = tb
                    else:
                        s = statistics.median(times[(how, b)])
                    by_size[str(b)] = {"batch": b, "s": s, "tok_s": tokens / s,
                                       "ratio_to_1": ts / s}
                e[key] = by_size
            by_size = e["by_size"]
            log(f"    {name}: {tokens / tb:.0f} tok/s together vs {tokens / ts:.0f} tok/s one "
                f"after another = {ts / tb:.2f}x (target >= 4x); outputs token-identical: "
                f"{e['identical']}; by batch size (groups of b): "
                + ", ".join(f"{b}: {r['ratio_to_1']:.2f}x" for b, r in by_size.items())
                + "; at most b running: "
                + ", ".join(f"{b}: {r['ratio_to_1']:.2f}x"
                            for b, r in e["by_size_capped"].items()))
            if not e["identical"]:
                log(f"    ! {name}: outputs differ: "
                    + "; ".join(f"{k}: {c['n'] - c['n_identical']} of {c['n']}"
                                for k, c in cmp_.items() if not c["identical"]))
            wsd = None
            return e
    finally:
        torch.set_num_threads(old_threads)


def _shape(m) -> str:
    c = m.config
    return (f"{c.num_layers} layers, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
            f"heads {c.num_heads}/{c.num_kv_heads}, vocab {c.vocab_size}")


# ------------------------------------------------------------------------- GPU

def measure_gpu(log, dev, dtype, backend: str, pilot_name: str, base_name: str, pc, bc,
                prompt_len: int, response: int, chunk: int, ks: tuple[int, int], sizes,
                n_prompts: int, ref_prompts: int, reps: int = 1, reference: bool = True,
                decode_kernels: dict | None = None, remaining=None) -> dict:
    """Random-weight pilot + base (configs pc, bc) on `dev`: b requests together for each b
    in `sizes` (switch points spread over ks, EOS ignored), then n_prompts prompts through
    the engine against wsd_engine.reference on ref_prompts of them (it runs one prompt at a
    time; the n_prompts time is extrapolated). `remaining()`: seconds left (None: no
    budget); what would start after it ran out is recorded as skipped."""
    from wsd_engine.engine import WSD, WSDParams
    from wsd_engine.loading import random_model
    sizes = sorted(set(sizes))
    slots = max(sizes)
    msl = prompt_len + response + 64
    e = {"pilot": pilot_name, "base": base_name, "device": str(dev), "dtype": str(dtype),
         "backend": backend, "prompt_len": prompt_len, "response": response, "chunk": chunk,
         "switch_range": list(ks), "sizes": sizes, "max_batch_size": slots, "reps": reps,
         "cuda_graphs": dev.type == "cuda" and backend == "triton",
         "note": "decode positions replay the row graphs of the smallest batch bucket that "
                 "holds the rows (scoring and prefill eager); b requests at batch b, switch points spread evenly over the range (batch "
                 "1: the middle); each size warmed up first (kernel compiles)",
         "by_size": {}}

    def out_of_time() -> bool:
        r = remaining() if remaining is not None else None
        return r is not None and r <= 0

    t0 = time.perf_counter()
    pilot = random_model(pc, dev, dtype, max_seq_len=msl, backend=backend, seed=0,
                         max_batch_size=slots)
    base = random_model(bc, dev, dtype, max_seq_len=msl, backend=backend, seed=1,
                        max_batch_size=slots)
    graphs = dev.type == "cuda" and backend == "triton"
    wsd = WSD(pilot, base, cuda_graphs=graphs, graph_batch_sizes=tuple(sizes),
              **(decode_kernels or {}))
    e["setup_s"] = time.perf_counter() - t0
    e["pilot_params"], e["base_params"] = n_params(pilot), n_params(base)
    vocab = min(pc.vocab_size, bc.vocab_size)
    n_all = max(n_prompts, slots)
    ids = [prompt_ids(vocab, prompt_len, seed=1000 + i) for i in range(n_all)]

    def params(k: int, n: int = response) -> WSDParams:
        return WSDParams(draft_max_tokens=response, max_new_tokens=n, chunk=chunk,
                         force_switch=k, ignore_eos=True)

    def run(b: int, k_list, n: int = response):
        return wsd.generate_ids(ids[:b], ids[:b], [params(k, n) for k in k_list])

    log(f"    gpu: {pilot_name} ({e['pilot_params'] / 1e9:.2f}B) + {base_name} "
        f"({e['base_params'] / 1e9:.2f}B), {dtype}, {backend}; set-up {e['setup_s']:.1f} s")
    for b in sizes:
        if out_of_time():
            e["by_size"][str(b)] = {"batch": b, "skipped": "time budget spent"}
            continue
        k_list = spread(ks[0], ks[1], b)
        # warm-up: the same row mix (every switch happens) with a shorter continuation
        tw, _ = timed(lambda: run(b, k_list, min(response, ks[1] + 2 * chunk)), dev)
        walls = []
        for _ in range(reps):
            s, res = timed(lambda: run(b, k_list), dev)
            walls.append(s)
            bad = [len(r.token_ids) for r in res if len(r.token_ids) != response]
            if bad:
                raise RuntimeError(f"batch {b}: answers of {bad} tokens, expected {response}")
        s = statistics.median(walls)
        rec = {"batch": b, "s": s, "tok_s": b * response / s, "all_s": walls,
               "warmup_s": tw, "switch_points": k_list}
        e["by_size"][str(b)] = rec
        log(f"    gpu batch {b}: {s:.2f} s for {b} x {response} tokens = "
            f"{rec['tok_s']:.0f} tok/s (warm-up {tw:.1f} s)")
    one = e["by_size"].get("1", {}).get("tok_s")
    for rec in e["by_size"].values():
        if one and "tok_s" in rec:
            rec["ratio_to_1"] = rec["tok_s"] / one
    if one and "16" in e["by_size"] and "ratio_to_1" in e["by_size"]["16"]:
        e["meets_16_10x"] = e["by_size"]["16"]["ratio_to_1"] >= 10.0

    # n_prompts prompts through the engine (at most `slots` at a time)
    eng = {"prompts": n_prompts, "max_running": slots}
    e["engine_batch"] = eng
    if out_of_time():
        eng["skipped"] = "time budget spent"
    else:
        k_list = spread(ks[0], ks[1], n_prompts)
        s, res = timed(lambda: wsd.generate_ids(ids[:n_prompts], ids[:n_prompts],
                                                [params(k) for k in k_list]), dev)
        eng.update(s=s, tok_s=_tokens(res) / s, output_tokens=_tokens(res))
        log(f"    gpu engine, {n_prompts} prompts (<= {slots} at a time): {s:.2f} s = "
            f"{eng['tok_s']:.0f} tok/s")
    wsd = pilot = base = None
    free_memory(dev)

    # the reference pipeline: one prompt at a time
    ref = {"prompts": n_prompts, "timed_prompts": ref_prompts}
    e["reference"] = ref
    if not reference:
        ref["skipped"] = "--no-reference"
    elif out_of_time():
        ref["skipped"] = "time budget spent"
    else:
        try:
            ref.update(_reference_batch(log, dev, dtype, pc, bc, ids, response, ks,
                                        n_prompts, ref_prompts))
            if "tok_s" in eng:
                ref["engine_speedup"] = eng["tok_s"] / ref["tok_s_extrapolated"]
        finally:
            free_memory(dev)
    return e


def _reference_batch(log, dev, dtype, pc, bc, ids, response, ks, n_prompts, n_timed) -> dict:
    """wsd_engine.reference on random HF models of the pair's shapes: it has no batch
    (`generate_ids` takes one prompt; stage 1 is HF `generate` drafting the whole response
    at batch 1), so the first n_timed of the n_prompts prompts are run one after another
    at their switch points and the n_prompts time is extrapolated from their mean."""
    from transformers import AutoModelForCausalLM

    from benchmarks.baselines import hf_config
    from wsd_engine.reference import ReferenceWSD
    models = []
    for cfg in (pc, bc):
        with torch.device(dev):
            models.append(AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype).to(dev))
    ref = ReferenceWSD.from_models(*models)
    k_all = spread(ks[0], ks[1], n_prompts)
    n_timed = max(1, min(n_timed, n_prompts))
    # the timed prompts spread over the switch range too (first, last, then between)
    pick = sorted(set(spread(0, n_prompts - 1, n_timed)))
    ref.generate_ids(ids[0], ids[0], draft_max_tokens=min(response, 8),
                     max_new_tokens=min(response, 16), force_switch=min(ks[0], 8),
                     ignore_eos=True)                                          # warm-up
    walls = []
    for i in pick:
        s, r = timed(lambda i=i: ref.generate_ids(ids[i], ids[i], draft_max_tokens=response,
                                                  max_new_tokens=response,
                                                  force_switch=k_all[i], ignore_eos=True), dev)
        if len(r.token_ids) != response:
            raise RuntimeError(f"reference returned {len(r.token_ids)} tokens, expected "
                               f"{response}")
        walls.append(s)
        log(f"    gpu reference, prompt {i} (k = {k_all[i]}): {s:.2f} s")
    models = ref = None
    mean = sum(walls) / len(walls)
    return {"timed_indices": pick, "timed_s": walls, "mean_s_per_prompt": mean,
            "extrapolated_s": mean * n_prompts,
            "tok_s_extrapolated": response / mean,
            "note": "wsd_engine.reference cannot batch (generate_ids takes one prompt; HF "
                    "generate at batch 1 drafts the whole response, one forward scores it, "
                    "generate continues): timed on these prompts one after another, the "
                    f"{n_prompts}-prompt time extrapolated from their mean"}


# ------------------------------------------------------------------------- suite tasks

def _entry(b) -> dict:
    return b.R.setdefault("batch", {"cpu": {}, "gpu": None})


def cpu_task(b, name: str) -> None:
    a = b.a
    e = _entry(b)
    holder: dict = {}
    b.attempt(holder, "run",
              lambda: measure_cpu_pair(name, b.log, a.batch_reps, a.batch_requests,
                                       a.batch_max_new, a.batch_draft, a.batch_cpu_ks,
                                       a.batch_cpu_sizes, a.batch_threads, a.chunk),
              f"batch cpu {name}")
    e["cpu"][name] = holder["run"]


def gpu_task(b) -> None:
    a = b.a
    e = _entry(b)
    if not torch.cuda.is_available():
        e["gpu"] = {"skipped": "no CUDA"}
        b.R["skipped"].append({"task": "batch gpu", "reason": "no CUDA"})
        b.log("    batch gpu: skipped: no CUDA")
        return
    if b.smoke:
        e["gpu"] = {"skipped": "--cpu-smoke"}
        b.R["skipped"].append({"task": "batch gpu", "reason": "--cpu-smoke"})
        b.log("    batch gpu: skipped: --cpu-smoke")
        return
    pn, bn = a.pairs[0]
    holder: dict = {}
    dev = torch.device("cuda")
    b.attempt(holder, "run",
              lambda: measure_gpu(b.log, dev, torch.bfloat16, "triton", pn, bn,
                                  model_cfg(pn, False), model_cfg(bn, False), a.prompt_len,
                                  a.response, a.chunk, a.batch_gpu_ks, a.batch_gpu_sizes,
                                  a.batch_gpu_prompts, a.batch_ref_prompts,
                                  reps=a.batch_gpu_reps, reference=not a.no_reference,
                                  decode_kernels={k: v for k, v in
                                                  getattr(b, "decode_kernels", {}).items()
                                                  if k in ("fused_gemv", "pdl")},
                                  remaining=b.remaining),
              "batch gpu")
    e["gpu"] = holder["run"]
