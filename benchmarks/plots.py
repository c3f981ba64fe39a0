"""PNG plots of benchmarks/run.py results (optional: needs matplotlib).

    decode.png  decode tok/s per model, this engine vs baselines, the floor's tok/s marked
    wsd.png     WSD latency by phase (stacked) per forced switch point k, next to base-only
"""
from __future__ import annotations

import math
import os

from benchmarks.report import SMOKE_LABEL, shape_label

SYSTEM_ORDER = ("engine_graph_tuned", "engine_graph_steps_fused_pdl", "engine_graph_steps_fused",
                "engine_graph_steps", "engine_graph", "engine_torch_eager", "hf_eager",
                "hf_compile")
LABELS = {"engine_graph_tuned": "wsd_engine generate, tuned kernels (default)",
          "engine_graph_steps_fused_pdl": "wsd_engine, 16-step graphs + fused gemv + PDL",
          "engine_graph_steps_fused": "wsd_engine, 16-step graphs + fused gemv",
          "engine_graph_steps": "wsd_engine, 16-step graphs",
          "engine_graph": "wsd_engine generate, graph per step",
          "engine_torch_eager": "wsd_engine torch eager",
          "hf_eager": "HF eager generate",
          "hf_compile": "HF static + torch.compile"}
COLORS = {"engine_graph_tuned": "#d62728", "engine_graph_steps_fused_pdl": "#54278f", "engine_graph_steps_fused": "#000000",
          "engine_graph_steps": "#08306b", "engine_graph": "#1f77b4",
          "engine_torch_eager": "#9ecae1", "hf_eager": "#ff7f0e", "hf_compile": "#fdae6b"}
PHASES = ("prefill", "drafting", "scoring", "continuation")
PHASE_COLORS = ("#c7e9c0", "#fdd0a2", "#74c476", "#fd8d3c", "#6baed6")



def _save(plt, fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x) and x > 0


def make_plots(R: dict, out_dir: str) -> list[str]:
    """Write decode.png / wsd.png into out_dir; returns messages (what was written or why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed: no plots (results.json / results.md hold "
                "everything)"]
    msgs = []
    title_dev = R["meta"]["device"] + (" [CPU smoke]" if R["meta"].get("cpu_smoke") else "")

    # ---- decode.png
    dec = {p: e for p, e in R.get("decode", {}).items()
           if any(_ok(s.get("tok_s")) for s in e.get("systems", {}).values())}
    if dec:
        fig, ax = plt.subplots(figsize=(max(7, 2.6 * len(dec) + 4), 4.8))
        width = 0.8 / len(SYSTEM_ORDER)
        used = set()
        for i, (preset, e) in enumerate(dec.items()):
            for j, key in enumerate(SYSTEM_ORDER):
                r = e["systems"].get(key, {})
                x = i + (j - (len(SYSTEM_ORDER) - 1) / 2) * width
                if _ok(r.get("tok_s")):
                    ax.bar(x, r["tok_s"], width * 0.95, color=COLORS[key],
                           label=LABELS[key] if key not in used else None)
                    used.add(key)
                    frac = r.get("frac_of_floor")
                    if _ok(frac):
                        ax.text(x, r["tok_s"], f"{r['tok_s']:.0f}\n{100 * frac:.0f}%",
                                ha="center", va="bottom", fontsize=7)
                elif r:
                    ax.text(x, 0.02, "error" if "error" in r else "n/a", ha="center",
                            va="bottom", fontsize=7, rotation=90, color="gray",
                            transform=ax.get_xaxis_transform())
            ft = e.get("floor_tok_s")
            if _ok(ft):
                ax.hlines(ft, i - 0.45, i + 0.45, colors="k", linestyles="--",
                          label="floor (weights / copy BW)" if i == 0 else None)
        vals = [r["tok_s"] for e in dec.values() for r in e["systems"].values()
                if _ok(r.get("tok_s"))] + [e["floor_tok_s"] for e in dec.values()
                                           if _ok(e.get("floor_tok_s"))]
        if vals and max(vals) / min(vals) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(dec)))
        smoke = R["meta"].get("cpu_smoke")   # tiny shapes under the preset names: say so
        ax.set_xticklabels([f"{SMOKE_LABEL}\nas {p}" if smoke else p for p in dec],
                           fontsize=8 if smoke else None)
        ax.set_ylabel("decode tokens / s (batch 1)")
        ax.set_title(f"Decode speed, % = fraction of the floor \u2014 {title_dev}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        msgs.append(_save(plt, fig, out_dir, "decode.png"))
    else:
        msgs.append("decode.png: no decode numbers to plot")

    # ---- wsd.png
    pairs = {k: e for k, e in R.get("wsd", {}).items()
             if k != "checkpoints" and any("total_s" in r for r in e.get("runs", []))}
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.8), squeeze=False)
        for ax, (key, e) in zip(axes[0], pairs.items()):
            labels, x = [], 0
            for r in e["runs"]:
                labels.append(r.get("label", "?"))
                if "total_s" in r:
                    bottom = 0.0
                    for ph, col in zip(PHASES, PHASE_COLORS):
                        h = r["timings"].get(ph, 0.0)
                        ax.bar(x, h, 0.7, bottom=bottom, color=col,
                               label=ph if x == 0 else None)
                        bottom += h
                    ax.hlines(r["ideal_s"], x - 0.35, x + 0.35, colors="r",
                              label="ideal (floors)" if x == 0 else None)
                    ax.text(x, bottom, f"{r['total_s']:.2f}s", ha="center", va="bottom",
                            fontsize=7)
                x += 1
            bo = e.get("base_only", {})
            labels.append("base-only")
            if "total_s" in bo:
                ax.bar(x, bo["total_s"], 0.7, color="#969696", label="base-only decode")
                ax.hlines(bo["ideal_s"], x - 0.35, x + 0.35, colors="r")
                ax.text(x, bo["total_s"], f"{bo['total_s']:.2f}s", ha="center", va="bottom",
                        fontsize=7)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel("seconds")
            ax.set_title(f"{shape_label(key, R)}: {e.get('response')} tokens", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"WSD latency by phase (forced switch k) \u2014 {title_dev}", fontsize=10)
        msgs.append(_save(plt, fig, out_dir, "wsd.png"))
    else:
        msgs.append("wsd.png: no WSD numbers to plot")
    if R.get("batch"):
        msgs.append(_batch_plot(plt, R, out_dir, title_dev))
    return msgs


def _batch_plot(plt, R: dict, out_dir: str, title_dev: str) -> str:
    """batch.png: output-token throughput against batch size (left) and as a ratio to
    batch 1 with the ideal (linear) line (right), one line per CPU pair and the GPU run."""
    B = R["batch"]
    series = {}
    for name, e in (B.get("cpu") or {}).items():
        if e and e.get("by_size"):
            series[f"CPU {name} ({e['threads']} thr), groups of b"] = e["by_size"]
        if e and e.get("by_size_capped"):
            series[f"CPU {name} ({e['threads']} thr), at most b running"] = e["by_size_capped"]
    g = B.get("gpu") or {}
    if g.get("by_size"):
        series[f"GPU {g['pilot']} + {g['base']}"] = g["by_size"]
    series = {k: [(int(b), r) for b, r in v.items() if _ok(r.get("tok_s"))]
              for k, v in series.items()}
    series = {k: sorted(v, key=lambda x: x[0]) for k, v in series.items() if v}
    if not series:
        return "batch.png: no batch numbers to plot"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    top = 1
    for label, pts in series.items():
        xs = [b for b, _ in pts]
        ax.plot(xs, [r["tok_s"] for _, r in pts], marker="o", label=label)
        if any("ratio_to_1" in r for _, r in pts):
            ax2.plot(xs, [r.get("ratio_to_1", float("nan")) for _, r in pts], marker="o",
                     label=label)
        top = max(top, max(xs))
    ax2.plot([1, top], [1, top], "k--", linewidth=0.8, label="ideal (linear)")
    for a_ in (ax, ax2):
        a_.set_xscale("log", base=2)
        a_.set_yscale("log")
        a_.set_xlabel("batch size (requests running together)")
        a_.legend(fontsize=7)
    ax.set_ylabel("output tokens / s")
    ax2.set_ylabel("throughput / throughput at batch 1")
    fig.suptitle(f"WSD throughput by batch size \u2014 {title_dev}", fontsize=10)
    return _save(plt, fig, out_dir, "batch.png")
