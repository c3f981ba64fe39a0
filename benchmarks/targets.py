"""Every speed target of the kernel and end-to-end issues, read from one GPU session's
outputs (`benchmarks/gpu_check.sh` writes them under $OUT), as one table: target, measured
value, met / NOT met / not measured, and where the number comes from.

    python -m benchmarks.targets gpu_out            # markdown on stdout
    python -m benchmarks.targets gpu_out --json t.json

Files read (each optional; a missing one makes its rows "not measured"):
  e2e/results.json, wsd_fast/results.json, hf_compile/results.json   (benchmarks.run)
  switch_score.json, attention.json, backend.json, gemv.json          (bench_*.py)
Plus the one-token kernel choice that each model's start-up tuning made (issue 5's engine
default) and the fused gemv against cuBLAS per shape (which decides FUSED_GEMV_DEFAULT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ENGINE_DECODE = ("engine_graph", "engine_graph_steps", "engine_graph_steps_fused",
                 "engine_graph_steps_fused_pdl", "engine_graph_tuned")
DECODE_TARGETS = (("llama3.1-8b", 0.90), ("llama3.2-3b", 0.85), ("llama3.2-1b", 0.75))


def _load(out: str, rel: str):
    path = os.path.join(out, rel)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"_unreadable": f"{type(e).__name__}: {e}"}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _speed(ratio: float, digits: int = 2, than: str = "") -> str:
    """A speed ratio (> 1 = faster) in words: "1.25x faster" / "1.25x slower" for 0.8
    (never "0.80x faster"), + " than X" with `than`; "same speed" / "as fast as X"."""
    if round(ratio, digits) == 1.0:
        return f"as fast as {than}" if than else "same speed"
    word = (f"{ratio:.{digits}f}x faster" if ratio > 1
            else f"{1 / ratio:.{digits}f}x slower")
    return f"{word} than {than}" if than else word


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, issue: int, target: str, value, ok: bool | None, source: str, how: str = ""):
        """ok None = not measured (value then says why)."""
        status = "not measured" if ok is None else ("met" if ok else "NOT met")
        self.rows.append(dict(issue=issue, target=target, measured=value, status=status,
                              source=source, detail=how))

    def markdown(self) -> str:
        L = ["| issue | target | measured | status | from |", "|---:|---|---|---|---|"]
        for r in self.rows:
            m = r["measured"] + (f" ({r['detail']})" if r["detail"] else "")
            st = f"**{r['status']}**" if r["status"] == "NOT met" else r["status"]
            L.append(f"| {r['issue']} | {r['target']} | {m} | {st} | {r['source']} |")
        n = {s: sum(r["status"] == s for r in self.rows) for s in ("met", "NOT met",
                                                                   "not measured")}
        L += ["", f"{n['met']} met, {n['NOT met']} not met, {n['not measured']} not measured."]
        return "\n".join(L)


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def switch_score(t: Table, S) -> None:
    src = "switch_score.json"
    row = next((r for r in (S or {}).get("results", []) if r.get("impl") == "triton switch_score"
                and _num(r.get("frac_copy"))), None)
    if row is None:
        t.add(4, "switch_score (c 8, V 128256, d 4096) >= 85% of the lm_head read floor",
              "no row", None, src)
        return
    t.add(4, "switch_score (c 8, V 128256, d 4096) >= 85% of the lm_head read floor",
          _pct(row["frac_copy"]), row["frac_copy"] >= 0.85, src,
          f"{row['ms'] * 1e3:.0f} us, "
          + (_speed(row["speedup"], 1, "the fp32 reference") if _num(row.get("speedup"))
             and row["speedup"] > 0 else "no fp32 reference time"))


def attention(t: Table, A) -> None:
    src = "attention.json"
    rows = (A or {}).get("rows", [])
    dec = [r for r in rows if r.get("op") == "decode" and r.get("ctx") == 8192
           and str(r.get("impl", "")).startswith("triton") and _num(r.get("frac_copy"))]
    name = "decode_attention at 8k context >= 80% of the K/V read floor"
    if not dec:
        t.add(4, name, "no 8k rows", None, src)
    else:
        best = max(dec, key=lambda r: r["frac_copy"])
        sdpa = next((r for r in rows if r.get("op") == "decode" and r.get("ctx") == 8192
                     and r.get("impl") == "sdpa"), None)
        how = f"{best['impl']}, {best['us']:.1f} us"
        if sdpa:
            how += f"; SDPA {sdpa['us']:.1f} us = {_pct(sdpa['frac_copy'])}"
        t.add(4, name, _pct(best["frac_copy"]), best["frac_copy"] >= 0.80, src, how)
    for L in (8, 64, 512):
        pre = {r["impl"]: r["us"] for r in rows if r.get("op") == "prefill" and r.get("L") == L
               and _num(r.get("us"))}
        sd = [pre[k] for k in ("sdpa_lower_right", "sdpa_mask") if k in pre]
        name = f"prefill_attention L={L} at least as fast as SDPA"
        if "triton" not in pre or not sd:
            t.add(4, name, "no rows", None, src)
        else:
            t.add(4, name, f"{pre['triton']:.1f} us vs {min(sd):.1f} us",
                  pre["triton"] <= min(sd), src, _speed(min(sd) / pre["triton"], 2, "SDPA"))


def _best_engine(systems: dict):
    ok = [(k, v) for k, v in systems.items() if k in ENGINE_DECODE and _num(v.get("frac_of_floor"))]
    return max(ok, key=lambda kv: kv[1]["frac_of_floor"]) if ok else (None, None)


def decode(t: Table, E) -> None:
    src = "e2e/results.json"
    dec = (E or {}).get("decode", {})
    for preset, goal in DECODE_TARGETS:
        name = f"decode {preset} >= {goal:.0%} of the floor"
        systems = dec.get(preset, {}).get("systems", {})
        key, r = _best_engine(systems)
        if r is None:
            t.add(5, name, "no engine row", None, src)
            continue
        how = f"{key}, {r['tok_s']:.0f} tok/s"
        tuned = systems.get("engine_graph_tuned", {})
        if key != "engine_graph_tuned" and _num(tuned.get("frac_of_floor")):
            how += f"; tuned default {_pct(tuned['frac_of_floor'])}"
        t.add(5, name, _pct(r["frac_of_floor"]), r["frac_of_floor"] >= goal, src, how)
    for preset in (p for p, _ in DECODE_TARGETS):
        systems = dec.get(preset, {}).get("systems", {})
        key, r = _best_engine(systems)
        hf = systems.get("hf_eager", {})
        if r is None or not _num(hf.get("decode_ms_per_token")):
            continue
        x = hf["decode_ms_per_token"] / r["decode_ms_per_token"]
        t.add(5, f"decode {preset} >= 10x HF transformers eager", f"{x:.1f}x", x >= 10, src)
    e8 = dec.get("llama3.1-8b", {})
    name = "prefill of a 128-token prompt, 8B, <= 1.5x its weight-read floor"
    found = [(how, e8[key]) for key, how in (("prefill_graph", "bucket graph"),
                                            ("prefill", "eager"))
             if _num(e8.get(key, {}).get("over_floor")) and e8[key].get("prompt_len") == 128]
    if found:   # the graph when measured: what the engine runs with CUDA graphs
        how, pre = found[0]
        other = "; ".join(f"{h} {r['over_floor']:.2f}x" for h, r in found[1:])
        t.add(5, name, f"{pre['over_floor']:.2f}x", pre["over_floor"] <= 1.5, src,
              f"{how}, {pre['ms']:.2f} ms" + (f"; {other}" if other else ""))
    else:
        t.add(5, name, "no 128-token 8B prefill row", None, src)


def hf_compile(t: Table, *results) -> None:
    name = "HF static cache + torch.compile: its number, or its error"
    for src, R in results:
        for preset, e in (R or {}).get("decode", {}).items():
            r = e.get("systems", {}).get("hf_compile", {})
            if _num(r.get("decode_ms_per_token")):
                t.add(5, name, f"{preset}: {r['decode_ms_per_token']:.2f} ms/token "
                      f"({_pct(r.get('frac_of_floor') or 0)} of floor)", True, src)
                return
            if "error" in r:
                t.add(5, name, f"{preset}: error: {' '.join(str(r['error']).split())[:160]}",
                      True, src)
                return
    t.add(5, name, "not run", None, "hf_compile/results.json")


def wsd(t: Table, *results) -> None:
    runs, refs = [], []
    for src, R in results:
        for pair, e in (R or {}).get("wsd", {}).items():
            if not isinstance(e, dict) or "runs" not in e:
                continue
            tag = src.split("/")[0]
            runs += [(f"{pair} [{tag}]", src, r) for r in e["runs"]
                     if _num(r.get("measured_over_ideal"))]
            ref = e.get("reference", {})
            if _num(ref.get("speedup_of_engine")):
                refs.append((pair, src, ref))
            for model, rec in (e.get("kernel_tuning") or {}).items():
                if isinstance(rec, dict) and "chosen" in rec:
                    rows = "; ".join(f"{'fused' if r['fused_gemv'] else 'cuBLAS'}"
                                     f"{'+pdl' if r['pdl'] else ''} "
                                     + (f"{r['ms']:.3f} ms" if "ms" in r
                                        else str(r.get("error", "failed"))[:60])
                                     for r in rec.get("rows", []))
                    c = rec["chosen"]
                    t.add(5, f"start-up kernel choice, {pair} {model}",
                          f"fused_gemv={c['fused_gemv']}, pdl={c['pdl']}", True, src, rows)
    if not runs:
        t.add(5, "WSD end to end <= 1.15x its ideal", "no WSD runs", None, "e2e/results.json")
    for label, src, r in runs:
        k = "never" if r.get("k") == 0 else r.get("k")
        t.add(5, f"WSD <= 1.15x ideal: {label} k={k}", f"{r['measured_over_ideal']:.2f}x",
              r["measured_over_ideal"] <= 1.15, src,
              f"{r['total_s']:.3f} s; " + (
                  _speed(r["speedup_vs_base_only"], 2, "base-only")
                  if _num(r.get("speedup_vs_base_only")) and r["speedup_vs_base_only"] > 0
                  else "no base-only time"))
        if r.get("k") == 0 or (r.get("k") or 0) >= 64:
            sp = r.get("speedup_vs_base_only")
            if _num(sp):
                t.add(5, f"WSD faster than base-only for k >= 64: {label} k={k}",
                      _speed(sp) if sp > 0 else f"{sp:.2f}x", sp > 1.0, src)
    if not refs:
        t.add(5, "WSD >= 10x wsd_engine.reference on the same card", "no reference run", None,
              "e2e/results.json")
    for pair, src, ref in refs:
        t.add(5, f"WSD >= 10x wsd_engine.reference: {pair} k={ref.get('k')}",
              f"{ref['speedup_of_engine']:.1f}x", ref["speedup_of_engine"] >= 10, src,
              f"reference {ref['total_s']:.1f} s")


def score_chunk(t: Table, B) -> None:
    src = "backend.json"
    name = "scoring a chunk of 8 on the 8B <= 1.15x one decode step"
    g = (B or {}).get("triton_graph", {})
    if _num(g.get("score8_over_decode")):
        t.add(5, name, f"{g['score8_over_decode']:.2f}x", g["score8_over_decode"] <= 1.15, src,
              f"graphs: {g['score8_ms']:.3f} vs {g['decode_ms']:.3f} ms")
    else:
        t.add(5, name, "no graph rows", None, src)


def gemv(t: Table, G) -> None:
    """Informational (no target of its own): the fused gemv against the cuBLAS chain per
    shape; it decides whether the fused path can win the start-up tuning."""
    src = "gemv.json"
    rows = (G or {}).get("results", [])
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["impl"]: r for r in rows if r["case"] == case and _num(r.get("ms"))}
        f, u = by.get("gemv fused"), by.get("norm/swiglu kernel + F.linear")
        if f and u:
            t.add(4, f"gemv {case.split(' N=')[0]} vs norm kernel + cuBLAS (no target)",
                  f"{u['ms'] / f['ms']:.2f}x", True, src,
                  f"{_pct(f['frac_copy'])} vs {_pct(u['frac_copy'])} of copy BW")


def build(out: str) -> Table:
    t = Table()
    E = _load(out, "e2e/results.json")
    W = _load(out, "wsd_fast/results.json")
    H = _load(out, "hf_compile/results.json")
    switch_score(t, _load(out, "switch_score.json"))
    attention(t, _load(out, "attention.json"))
    gemv(t, _load(out, "gemv.json"))
    decode(t, E)
    score_chunk(t, _load(out, "backend.json"))
    wsd(t, ("e2e/results.json", E), ("wsd_fast/results.json", W))
    hf_compile(t, ("hf_compile/results.json", H), ("e2e/results.json", E))
    for rel in ("e2e/results.json", "wsd_fast/results.json", "hf_compile/results.json",
                "switch_score.json", "attention.json", "backend.json", "gemv.json"):
        R = _load(out, rel)
        if isinstance(R, dict) and "_unreadable" in R:
            t.add(0, f"{rel} readable", R["_unreadable"], False, rel)
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the folder gpu_check.sh wrote ($OUT)")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.out):
        print(f"benchmarks.targets: no folder {a.out!r}", file=sys.stderr)
        return 2
    t = build(a.out)
    print(t.markdown())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(t.rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
