"""results.md of benchmarks/run.py: the tables (decode, WSD, checkpoints, kernels) rendered
from the results dict that results.json holds.
"""
from __future__ import annotations

import math

from benchmarks.common import TINY, short_err

SYSTEMS = {   # decode systems: key -> label (table / plot order)
    "engine_graph_tuned": "wsd_engine generate, kernels tuned on this card (the default "
                          "with CUDA graphs)",
    "engine_graph": "wsd_engine generate (triton, graph per step, one step in flight)",
    "engine_graph_steps": "wsd_engine 16-step graph blocks (triton; the drafting path)",
    "engine_graph_steps_fused": "as above, fused_gemv (norm/SwiGLU in the matmul)",
    "engine_graph_steps_fused_pdl": "as above, + programmatic dependent launch (sm_90+)",
    "engine_torch_eager": "wsd_engine torch backend, eager",
    "hf_eager": "HF transformers eager generate",
    "hf_compile": "HF static cache + torch.compile",
}
SMOKE_LABEL = "tiny (CPU smoke)"
PHASES = ("prefill", "drafting", "scoring", "continuation")


def _f(x, fmt="{:.2f}", none="\u2014"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def speed(ratio, none="\u2014", digits=2) -> str:
    """A speed ratio (ours / theirs, > 1 = faster) in words: "1.25\u00d7 faster",
    "1.25\u00d7 slower" (for 0.8), "1.00\u00d7 (same)". Never "0.8\u00d7 faster"."""
    if ratio is None or not isinstance(ratio, (int, float)) or math.isnan(ratio) or ratio <= 0:
        return none
    r = round(ratio, digits)
    if r == 1.0:
        return f"{1:.{digits}f}\u00d7 (same)"
    if ratio > 1:
        return f"{ratio:.{digits}f}\u00d7 faster"
    return f"{1 / ratio:.{digits}f}\u00d7 slower"


def shape_label(name: str, R: dict) -> str:
    """A preset or pair name as a table label: in a CPU smoke run the models only borrow
    the name (the shapes are tiny), and the label says so."""
    return f"{SMOKE_LABEL}, as {name}" if R["meta"].get("cpu_smoke") else name


def render_md(R: dict) -> str:
    L = _header(R)
    if R["decode"]:
        L += _decode_section(R)
    if R["wsd"]:
        L += ["## WSD (forced switch point k, ignore EOS)", ""]
        for key, e in R["wsd"].items():
            if key != "checkpoints":
                L += _wsd_pair_table(shape_label(key, R), e)
        ck = R["wsd"].get("checkpoints")
        if ck:
            L += _checkpoints_table(ck)
    if R["kernels"]:
        L += _kernels_section(R["kernels"])
    if R.get("batch"):
        L += _batch_section(R["batch"])
    if R["skipped"]:
        L += ["## Skipped", ""] + [f"- {s['task']}: {s['reason']}" for s in R["skipped"]] + [""]
    if R["errors"]:
        L += ["## Errors", ""] + [f"- {e_['task']}: {short_err(e_['error'], 300)}"
                                  for e_ in R["errors"]] + [""]
    L.append(f"Run time {R.get('elapsed_s', 0):.0f} s.")
    return "\n".join(L) + "\n"


def _header(R: dict) -> list[str]:
    """Title, device, versions, settings, notes and the copy bandwidth."""
    m = R["meta"]
    v = m["versions"]
    L = [f"# wsd_engine benchmarks \u2014 {m['device']}", "",
         f"{m['date']}; torch {v['torch']}, triton {v.get('triton')}, transformers "
         f"{v.get('transformers')}; {m['dtype']}, backend {m['backend']}, CUDA graphs "
         f"{m['cuda_graphs']}" + (f"; **CPU smoke: tiny shapes ({TINY['num_layers']} layers, "
                                  f"hidden {TINY['hidden_size']}, vocab {TINY['vocab_size']}) "
                                  "standing in for the named presets; the numbers say "
                                  "nothing about the real models**"
                                  if m["cpu_smoke"] else ""), ""]
    for n in m.get("notes", []):
        L.append(f"> {n}")
    if R.get("copy_gbps"):
        L += [f"Copy bandwidth (bytes read + written / time): **{R['copy_gbps']:.0f} GB/s**. "
              "Floor of a model = weight bytes per decode step / copy bandwidth.", ""]
    return L


def _decode_section(R: dict) -> list[str]:
    """One table: per preset, the floor, then each decode system against HF eager."""
    s = R["meta"]["settings"]
    L = ["## Decode (batch 1, greedy)", "",
         f"{s['decode_steps']} tokens after a {s['prompt_len']}-token prompt; decode "
         "ms/token excludes the prefill and first token (see results.json `method`).", "",
         "| model | system | decode ms/token | tok/s | of floor | end-to-end tok/s | "
         "vs HF eager |", "|---|---|---:|---:|---:|---:|---:|"]
    for preset, e in R["decode"].items():
        name = shape_label(preset, R)
        L.append(f"| {name} | *floor* ({_f(R['models'].get(preset, {}).get('weight_bytes'), '{:.3g}')} B) | "
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
                L.append(f"| {name} | {label} | {what} | | | | |")
                continue
            ch = (r.get("tuning") or {}).get("chosen")
            if ch:
                label += ": " + _kernels_name(ch)
            L.append(f"| {name} | {label} | {_f(r['decode_ms_per_token'], '{:.3f}')} | "
                     f"{_f(r['tok_s'], '{:.1f}')} | {_f(r['frac_of_floor'])} | "
                     f"{_f(r.get('e2e_tok_s'), '{:.1f}')} | "
                     + ("1.00\u00d7 (baseline)" if key == "hf_eager"
                        else speed(r['tok_s'] / hf if hf else None)) + " |")
    L.append("")
    pre = [(shape_label(p, R), how, e[key]) for p, e in R["decode"].items()
           for key, how in (("prefill", "eager"), ("prefill_graph", "CUDA graph (bucket)"))
           if e.get(key)]
    if pre:
        L += ["Prefill (empty cache; floor = one weight read; target for the 8B at "
              "128 tokens: <= 1.5\u00d7 the floor):", "",
              "| model | how | prompt | ms | \u00d7 floor | prompt tok/s |",
              "|---|---|---:|---:|---:|---:|"]
        for p, how, r in pre:
            if "error" in r:
                L.append(f"| {p} | {how} | error: {short_err(r['error'])} | | | |")
            else:
                L.append(f"| {p} | {how} | {r['prompt_len']} | {r['ms']:.3f} | "
                         f"{r['over_floor']:.2f} | {r['prompt_tok_s']:.0f} |")
        L.append("")
    return L


def _kernels_name(k: dict) -> str:
    """A one-token kernel setting {fused_gemv, pdl} in words."""
    return ("fused gemv" if k["fused_gemv"] else "matmul + norm/SwiGLU apart") + \
        (" + PDL" if k["pdl"] else "")


def _kernels_line(e: dict) -> list[str]:
    """The one-token kernels each model ran, and the tuning's step times when it ran."""
    dk = e.get("decode_kernels")
    if not dk:
        return []
    parts = []
    for m in ("pilot", "base"):
        s = f"{m}: {_kernels_name(dk[m])}"
        tu = (e.get("kernel_tuning") or {}).get(m)
        if tu:
            s += " (tuned; step ms at " + str(tu["context"]) + " tokens: " + ", ".join(
                f"{_kernels_name(r)} {r['ms']:.3f}" if "ms" in r else f"{_kernels_name(r)} failed"
                for r in tu["rows"]) + ")"
        parts.append(s)
    return ["One-token kernels \u2014 " + "; ".join(parts) + ".", ""]


def _wsd_pair_table(key: str, e: dict) -> list[str]:
    """One pilot + base pair: a row per forced switch point k, then base-only decoding."""
    L = [f"### {key}", "",
         f"prompt {e.get('prompt_len')} random ids (same for both), response "
         f"{e.get('response')}, chunk {e.get('chunk')}; floors: pilot "
         f"{_f(e.get('pilot_floor_ms'), '{:.3f}')} ms, base "
         f"{_f(e.get('base_floor_ms'), '{:.3f}')} ms per step. Ideal = both prefills "
         "+ k pilot steps + ceil(k/chunk) scoring chunks + (response - k) base steps, "
         "each one weight read at its floor. Expected: WSD faster than base-only "
         "for k >= 64 (the pilot's steps are cheaper than the base's).", "",
         *_kernels_line(e),
         "| run | k kept | total s | prefill | drafting | "
         "scoring | continuation | ideal s | measured / ideal | vs base-only |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in e.get("runs", []):
        if "total_s" not in r:
            L.append(f"| {r.get('label')} | error: {short_err(r.get('error', '?'))} "
                     "| | | | | | | | | |")
            continue
        t = r["timings"]
        L.append(f"| {r['label']} | {r['switch_index']} | {r['total_s']:.3f} | "
                 + " | ".join(f"{t.get(p, 0.0):.3f}" for p in PHASES)
                 + f" | {r['ideal_s']:.3f} | {r['measured_over_ideal']:.2f} | "
                 f"{speed(r.get('speedup_vs_base_only'))} |")
    bo = e.get("base_only")
    if bo and "total_s" in bo:
        L.append(f"| base-only (this engine) | \u2014 | {bo['total_s']:.3f} | | | | | "
                 f"{bo['ideal_s']:.3f} | {bo['measured_over_ideal']:.2f} | "
                 "1.00\u00d7 (baseline) |")
    elif bo:
        L.append(f"| base-only | error: {short_err(bo.get('error', '?'))} | | | | | | | | | |")
    ref = e.get("reference", {})
    if "total_s" in ref:
        t = ref["timings"]
        bo_s = (bo or {}).get("total_s")
        L.append(f"| reference (HF, 3 offline stages) | {ref['switch_index']} | "
                 f"{ref['total_s']:.3f} | \u2014 | {t['draft']:.3f} | "
                 f"{t['score']:.3f} | {t['continuation']:.3f} | | | "
                 f"{speed(bo_s / ref['total_s'] if bo_s else None)} |")
        if ref.get("speedup_of_engine"):
            sp = speed(ref["speedup_of_engine"], digits=1)
            L.append(f"\nAt k = {ref['k']}: this engine is "
                     + ("as fast as" if sp.endswith("(same)") else sp + " than")
                     + " `wsd_engine.reference` on the same device (its pilot drafts the "
                     "whole response; prefills are inside its phases).")
    elif "error" in ref:
        L.append(f"\nreference: error \u2014 {short_err(ref['error'], 300)}")
    elif "skipped" in ref:
        L.append(f"\nreference: skipped \u2014 {ref['skipped']}")
    L.append("")
    return L


def _checkpoints_table(ck: dict) -> list[str]:
    """The given checkpoint pair: this engine (the real rule) vs wsd_engine.reference."""
    L = ["### checkpoints (the real rule) \u2014 engine vs reference", "",
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
            note = (f"{r.get('note', '')}; engine {speed(r.get('speedup_of_engine'))}; "
                    f"identical output: {r.get('identical')}")
        L.append(f"| {name} | {r['total_s']:.3f} | {r['switch_index']} | "
                 f"{r['n_tokens']} | {note} |")
    L.append("")
    return L


def _kernels_section(kernels: dict) -> list[str]:
    """A table per kernel benchmark (its JSON rows), each row against the copy bandwidth."""
    L = ["## Kernels", ""]
    for name, k in kernels.items():
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
            if us is None and ("error" in r or r.get("skipped")):
                why = ("failed: " + short_err(r["error"], 120)) if "error" in r else "skipped"
                L.append(f"| {case} | {r.get('impl')} | {why} | |")
                continue
            fc = r.get("frac_copy")
            if fc is None and r.get("gbps") is not None and cb:
                fc = r["gbps"] / cb
            L.append(f"| {case} | {r.get('impl')} | {_f(us, '{:.1f}')} | "
                     f"{_f(fc * 100 if fc is not None else None, '{:.1f}%')} |")
        L.append("")
    return L


def _batch_section(B: dict) -> list[str]:
    """The batch suite: CPU pairs (together vs one after another, by batch size) and the
    GPU run (by batch size, engine vs reference) or why it was skipped."""
    L = ["## Batch: many requests in one engine", ""]
    cpu = {k: v for k, v in (B.get("cpu") or {}).items() if v}
    if cpu:
        L += ["### CPU (torch backend; real measurements at the stated shapes, not the smoke's "
              "stand-ins)", "",
              "| pair | params pilot / base | threads | requests x tokens | switch points | "
              "together tok/s | one after another tok/s | ratio (target >= 4x) | "
              "token-identical |", "|---|---|---:|---|---|---:|---:|---:|---|"]
        for name, e in cpu.items():
            if "error" in e:
                L.append(f"| {name} | error: {short_err(e['error'])} | | | | | | | |")
                continue
            ks = e["switch_points"]
            L.append(f"| {name} | {e['pilot_params'] / 1e6:.1f}M / {e['base_params'] / 1e6:.1f}M "
                     f"| {e['threads']} | {e['requests']} x {e['max_new_tokens']} | "
                     f"{ks[0]}..{ks[-1]} | {e['batched_tok_s']:.0f} | "
                     f"{e['sequential_tok_s']:.0f} | {e['ratio']:.2f}x | "
                     f"{'yes' if e['identical'] else 'NO'} |")
        L.append("")
        sizes = sorted({int(b) for e in cpu.values() for b in e.get("by_size", {})})
        if sizes:
            L += ["Throughput by batch size, the same requests (ratio to batch 1); groups of "
                  "b: `generate` of b prompts at a time (rows start together); at most b "
                  "running: a finished row is replaced at once (drafting and continuing rows "
                  "mix):", "",
                  "| pair | how | " + " | ".join(f"b={b}" for b in sizes) + " |",
                  "|---|---|" + "---:|" * len(sizes)]
            for name, e in cpu.items():
                for key, how in (("by_size", "groups of b"),
                                 ("by_size_capped", "at most b running")):
                    bs = e.get(key)
                    if not bs:
                        continue
                    L.append(f"| {name} | {how} | " + " | ".join(
                        f"{bs[str(b)]['tok_s']:.0f} tok/s ({bs[str(b)]['ratio_to_1']:.2f}x)"
                        if str(b) in bs else "\u2014" for b in sizes) + " |")
            L.append("")
    g = B.get("gpu")
    if g:
        L += ["### GPU", ""]
        if "skipped" in g:
            L += [f"skipped: {g['skipped']}", ""]
        elif "error" in g:
            L += [f"error: {short_err(g['error'], 300)}", ""]
        else:
            L += [f"{g['pilot']} + {g['base']}, random weights, {g['dtype']}, {g['backend']}; "
                  f"prompts {g['prompt_len']}, responses {g['response']}, switch points "
                  f"spread over {g['switch_range'][0]}..{g['switch_range'][1]}. {g['note']}.", "",
                  "| batch | s | tok/s | ratio to batch 1 |", "|---:|---:|---:|---:|"]
            for b, r in g["by_size"].items():
                if "tok_s" in r:
                    L.append(f"| {b} | {r['s']:.2f} | {r['tok_s']:.0f} | "
                             f"{_f(r.get('ratio_to_1'))} |")
                else:
                    L.append(f"| {b} | {r.get('skipped') or short_err(r.get('error', '?'))} "
                             "| | |")
            L.append("")
            if "meets_16_10x" in g:
                L += [f"Batch 16 >= 10x batch 1: {'met' if g['meets_16_10x'] else 'NOT met'}.", ""]
            eng, ref = g.get("engine_batch", {}), g.get("reference", {})
            if "tok_s" in eng:
                L.append(f"Engine, {eng['prompts']} prompts (at most {eng['max_running']} at a "
                         f"time): {eng['s']:.2f} s, {eng['tok_s']:.0f} tok/s.")
            elif eng.get("skipped"):
                L.append(f"Engine, {eng['prompts']} prompts: skipped ({eng['skipped']}).")
            if "tok_s_extrapolated" in ref:
                L.append(f"Reference (`wsd_engine.reference`): {ref['note']}: "
                         f"{ref['mean_s_per_prompt']:.2f} s per prompt, "
                         f"{ref['extrapolated_s']:.1f} s for {ref['prompts']} prompts, "
                         f"{ref['tok_s_extrapolated']:.0f} tok/s; engine "
                         f"{speed(ref.get('engine_speedup'), digits=1)}.")
            elif "error" in ref:
                L.append(f"Reference: error \u2014 {short_err(ref['error'], 300)}")
            elif ref.get("skipped"):
                L.append(f"Reference: skipped ({ref['skipped']}).")
            L.append("")
    return L
