"""End-to-end benchmark suite of wsd_engine: kernels, decode, WSD.

    python -m benchmarks.run                                   # CUDA: everything, real shapes
    python -m benchmarks.run --suite decode,wsd --time-budget 480 --out bench_out
    python -m benchmarks.run --pilot DIR --base DIR            # + the reference oracle
    python -m benchmarks.run --cpu-smoke                       # tiny shapes on CPU, < 60 s
    python -m benchmarks.run --suite batch                     # many requests in one engine
    python -m benchmarks.run --suite tp                        # tensor parallelism, >= 2 GPUs
    wsd-engine bench ...                                       # the same, from a checkout

Every timing is reported against the floor of the model it runs: the weight bytes one
decode step must read / the device's copy bandwidth (a 1 GiB device-to-device copy,
bytes read + written, measured first, in the same run), and against baselines measured in
the same run (HF transformers eager `generate`, HF static cache + torch.compile, base-only
decoding with this engine, `wsd_engine.reference` (the paper's three offline stages on
HF transformers, on the same card, at one forced switch point per pair; with checkpoint
folders also on their text prompt with the real rule)).
Random bf16 weights at real shapes (never zeros); no checkpoint or network needed.

Suites, most important numbers first (with --time-budget the rest is skipped and recorded):
  decode of the first preset (ours + HF eager) -> WSD 1B+8B -> HF compile of the first
  preset -> WSD 3B+8B -> checkpoints + reference -> the other presets -> kernels.

The batch suite (only when named: `--suite batch`, see benchmarks/batch.py) runs 8 WSD
requests together vs one after another on CPU (the demo pair and a ~30M-parameter
synthetic pair) and, with CUDA, throughput by batch size at real shapes and a 64-prompt
batch against `wsd_engine.reference`.

The tp suite (only when named: `--suite tp`, see benchmarks/tp.py) splits a model over N
ranks: with >= 2 CUDA devices decode latency per token of llama3.1-70b for N = 2, 4, 8 against
its floor and N = 1 (where it fits), and WSD 3B + 70B on the split base vs base-only; on
CPU (--cpu-smoke) the same code on tiny shapes for N = 1, 2 (gloo). Also writes tp.md.

Writes into --out: results.json (everything; rewritten after each step, so a killed run
still leaves what it measured), results.md (tables), decode.png / wsd.png / batch.png (matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:                       # `python benchmarks/run.py` works too
    sys.path.insert(0, REPO)

# the parts: common (helpers), baselines (HF + child processes), suite (Bench: the steps),
# report (results.md), plots (PNGs)
from benchmarks.baselines import worker_main  # noqa: E402  (after the sys.path line above)
from benchmarks.common import ensure_kernels_importable  # noqa: E402
from benchmarks.report import render_md  # noqa: E402
from benchmarks.suite import Bench  # noqa: E402

PRESET_ORDER = ("llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "qwen2.5-7b")
PAIRS = (("llama3.2-1b", "llama3.1-8b"), ("llama3.2-3b", "llama3.1-8b"))
SUITES = ("kernels", "decode", "wsd", "batch", "tp")
DEFAULT_SUITES = ("kernels", "decode", "wsd")     # `batch` and `tp` run when named


# ------------------------------------------------------------------------- tasks

def build_tasks(b: Bench) -> list:
    a = b.a
    decode, wsd, kern = ("decode" in a.suites), ("wsd" in a.suites), ("kernels" in a.suites)
    batch = "batch" in a.suites
    tp = "tp" in a.suites
    presets = list(a.presets)
    t = [("copy bandwidth (1 GiB D2D copy)" if not b.smoke else "copy bandwidth (CPU)",
          b.copy_bandwidth)]
    first, rest = (presets[0], presets[1:]) if presets else (None, [])
    pairs = list(a.pairs)
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
        for k in ("switch_score", "attention", "layers", "gemv"):
            t.append((f"kernels {k}", lambda k=k: b.kernel(k)))
    if batch:
        from benchmarks import batch as bb
        # the GPU part first: on a GPU machine its device time is the scarce part (it
        # records "skipped: no CUDA" at once elsewhere)
        t.append(("batch gpu: throughput by batch size, engine vs reference",
                  lambda: bb.gpu_task(b)))
        for name in a.batch_cpu_pairs:
            t.append((f"batch cpu {name}: {a.batch_requests} requests together vs one after "
                      "another, by batch size", lambda n=name: bb.cpu_task(b, n)))
    if tp:
        from benchmarks import tp as tpb
        t.append(("tp gpu: decode by rank count, WSD on the split base",
                  lambda: tpb.gpu_task(b)))
        if b.smoke or a.tp_cpu:
            t.append((f"tp cpu: tiny shapes, N = {','.join(map(str, a.tp_cpu_sizes))} (gloo)",
                      lambda: tpb.cpu_task(b)))
    return t


# ------------------------------------------------------------------------- entry point

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                 description="wsd_engine end-to-end benchmarks: kernels, "
                                             "decode, WSD")
    ap.add_argument("--suite", default=",".join(DEFAULT_SUITES),
                    help="comma list of kernels, decode, wsd, batch, tp (default: kernels,"
                         "decode,wsd; batch and tp run when named)")
    ap.add_argument("--preset", nargs="+", default=None,
                    help=f"decode presets, most important first (default: {' '.join(PRESET_ORDER)})")
    ap.add_argument("--pairs", default=None,
                    help="WSD pairs as PILOT+BASE presets, comma-separated (default: "
                         + ",".join("+".join(p) for p in PAIRS) + ")")
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
    ap.add_argument("--ref-k", type=int, default=None,
                    help="switch point of the wsd_engine.reference run per pair, on the same "
                         "card (default 64; smoke 8)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference run per WSD pair (it drafts the whole response "
                         "with HF generate: tens of seconds at real shapes)")
    ap.add_argument("--no-hf-compile", action="store_true",
                    help="skip the HF static cache + torch.compile baseline (minutes each)")
    ap.add_argument("--no-torch-eager", action="store_true",
                    help="skip this engine's torch-backend eager decode (a slow reference "
                         "point, not a baseline of the targets)")
    ap.add_argument("--fused-gemv", action="store_true",
                    help="WSD runs (and their base-only baseline): one-token matmuls through "
                         "the gemv kernel (the decode suite times both ways regardless)")
    ap.add_argument("--pdl", action="store_true",
                    help="WSD runs: programmatic dependent launch for the one-token kernels")
    ap.add_argument("--no-tune", action="store_true",
                    help="WSD runs: keep the default one-token kernels (without this and "
                         "without --fused-gemv / --pdl, each model's are timed on the GPU "
                         "and the fastest kept, as the engine does by default)")
    ap.add_argument("--no-plots", action="store_true")
    g = ap.add_argument_group("batch suite (--suite batch)")
    g.add_argument("--batch-cpu-pairs", default=None,
                   help="CPU pairs, comma list of demo, 30m, tiny, or none (default demo,30m; "
                        "explicit --cpu-smoke: demo)")
    g.add_argument("--batch-requests", type=int, default=None,
                   help="CPU: requests run together vs one after another (default 8)")
    g.add_argument("--batch-max-new", type=int, default=None,
                   help="CPU: max_new_tokens of each request (default 128; smoke 32)")
    g.add_argument("--batch-draft", type=int, default=None,
                   help="CPU: draft_max_tokens (default 64; smoke 16)")
    g.add_argument("--batch-cpu-ks", default=None,
                   help="CPU: LO,HI forced switch points spread over the requests "
                        "(default 8,64; smoke 4,16)")
    g.add_argument("--batch-cpu-sizes", default=None,
                   help="CPU: batch sizes of the throughput ratios (default 1,2,4,8; "
                        "smoke 1,2,4)")
    g.add_argument("--batch-threads", type=int, default=os.cpu_count() or 1,
                   help="CPU: torch threads during the batch CPU runs (default: every core, "
                        "%(default)s here)")
    g.add_argument("--batch-reps", type=int, default=None,
                   help="CPU: repetitions, medians (default --reps)")
    g.add_argument("--batch-gpu-sizes", default="1,4,16,32",
                   help="GPU: batch sizes (default 1,4,16,32)")
    g.add_argument("--batch-gpu-ks", default="8,256",
                   help="GPU: LO,HI forced switch points (default 8,256)")
    g.add_argument("--batch-gpu-prompts", type=int, default=64,
                   help="GPU: prompts of the engine-vs-reference batch (default 64)")
    g.add_argument("--batch-ref-prompts", type=int, default=2,
                   help="GPU: of those, how many the reference (one prompt at a time) runs; "
                        "the rest is extrapolated (default 2)")
    g.add_argument("--batch-gpu-reps", type=int, default=1,
                   help="GPU: timed runs per batch size after its warm-up (default 1)")
    g = ap.add_argument_group("tp suite (--suite tp)")
    g.add_argument("--tp-presets", default="llama3.1-70b",
                   help="GPU: presets split over the ranks, comma list (default llama3.1-70b)")
    g.add_argument("--tp-sizes", default="2,4,8",
                   help="GPU: rank counts N (one GPU each; those above the device count are "
                        "skipped; N = 1 is added where the model fits one GPU) (default 2,4,8)")
    g.add_argument("--tp-pairs", default="llama3.2-3b+llama3.1-70b",
                   help="WSD pairs PILOT+BASE, the base split (default llama3.2-3b+llama3.1-70b)")
    g.add_argument("--tp-wsd-sizes", default=None,
                   help="GPU: rank counts of the WSD runs (default: the largest N measured)")
    g.add_argument("--tp-ks", default=None,
                   help="WSD forced switch points of the tp runs (default 64,256; smoke 4)")
    g.add_argument("--tp-cpu", action="store_true",
                   help="also run the CPU part (tiny shapes, gloo) without --cpu-smoke")
    g.add_argument("--tp-cpu-sizes", default="1,2",
                   help="CPU: rank counts (default 1,2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(argv)
    a.notes = []
    a.out = os.path.abspath(a.out)              # child processes run in the repository root
    if a.worker:
        return a
    smoke_asked = a.cpu_smoke
    if not a.cpu_smoke and not torch.cuda.is_available():
        a.cpu_smoke = True
        a.notes.append("no CUDA device: ran the CPU smoke (tiny shapes; timings are not "
                       "meaningful)")
    if os.environ.get("WSD_ENGINE_NO_PDL") == "1":
        a.notes.append("WSD_ENGINE_NO_PDL=1: programmatic dependent launch is off; rows "
                       "named pdl ran with ordinary launches")
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
    if a.pairs is None:
        a.pairs = list(PAIRS)
    else:
        pairs = [tuple(x.split("+")) for x in a.pairs.split(",") if x.strip()]
        bad = [p for p in pairs if len(p) != 2 or any(q not in PRESETS for q in p)]
        if bad or not pairs:
            ap.error(f"--pairs takes PILOT+BASE presets, comma-separated, from "
                     f"{', '.join(PRESETS)}; got {a.pairs!r}")
        a.pairs = pairs
    a.steps = a.steps or (8 if smoke else 128)
    a.prompt_len = a.prompt_len or (16 if smoke else 128)
    a.response = a.response or (24 if smoke else 512)
    a.reps = a.reps or (2 if smoke else 3)
    ks = a.ks or ("4,8,0" if smoke else "8,64,256,0")
    a.ks = [int(k) for k in ks.split(",") if k.strip()]
    a.ref_k = a.ref_k if a.ref_k is not None else (8 if smoke else 64)
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    if any(k < 0 or k > a.response for k in a.ks + [a.ref_k]):
        ap.error(f"--ks and --ref-k must lie in [0, --response={a.response}]")
    if bool(a.pilot) != bool(a.base):
        ap.error("give both --pilot and --base (or neither)")
    _batch_args(ap, a, smoke_asked)
    _tp_args(ap, a, PRESETS)
    return a


def _tp_args(ap, a, presets) -> None:
    """The tp suite's settings."""
    a.tp_presets = [p for p in a.tp_presets.split(",") if p.strip()]
    bad = [p for p in a.tp_presets if p not in presets]
    if bad or not a.tp_presets:
        ap.error(f"--tp-presets: unknown {bad}; choose from {', '.join(presets)}")
    a.tp_sizes = sorted(set(_int_list(ap, "--tp-sizes", a.tp_sizes)))
    a.tp_cpu_sizes = sorted(set(_int_list(ap, "--tp-cpu-sizes", a.tp_cpu_sizes)))
    a.tp_wsd_sizes = (sorted(set(_int_list(ap, "--tp-wsd-sizes", a.tp_wsd_sizes)))
                      if a.tp_wsd_sizes else None)
    pairs = [tuple(x.split("+")) for x in a.tp_pairs.split(",") if x.strip()]
    if any(len(p) != 2 or any(q not in presets for q in p) for p in pairs):
        ap.error(f"--tp-pairs takes PILOT+BASE presets, comma-separated; got {a.tp_pairs!r}")
    a.tp_pairs = pairs
    ks = a.tp_ks or ("4" if a.cpu_smoke else "64,256")
    try:
        a.tp_ks = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        a.tp_ks = []
    if "tp" in a.suites and (not a.tp_ks or any(k < 0 or k > a.response for k in a.tp_ks)):
        ap.error(f"--tp-ks: ints in [0, --response={a.response}], got {ks!r}")


def _int_list(ap, flag: str, text: str, n: int | None = None) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1 or (n is not None and len(out) != n):
        ap.error(f"{flag} takes " + (f"{n} " if n else "") + f"comma-separated ints >= 1, "
                 f"got {text!r}")
    return out


def _batch_args(ap, a, smoke_asked: bool) -> None:
    """The batch suite's settings (an explicit --cpu-smoke shrinks the CPU defaults)."""
    from benchmarks.batch import CPU_PAIRS
    q = smoke_asked
    pairs = a.batch_cpu_pairs or ("demo" if q else "demo,30m")
    a.batch_cpu_pairs = [] if pairs == "none" else [p for p in pairs.split(",") if p]
    bad = [p for p in a.batch_cpu_pairs if p not in CPU_PAIRS]
    if bad:
        ap.error(f"--batch-cpu-pairs: unknown {bad}; choose from {', '.join(CPU_PAIRS)} "
                 "or none")
    a.batch_requests = a.batch_requests or (4 if q else 8)
    a.batch_max_new = a.batch_max_new or (32 if q else 128)
    a.batch_draft = a.batch_draft or (16 if q else 64)
    a.batch_cpu_ks = _int_list(ap, "--batch-cpu-ks", a.batch_cpu_ks or ("4,16" if q else "8,64"), 2)
    a.batch_cpu_sizes = _int_list(ap, "--batch-cpu-sizes",
                                  a.batch_cpu_sizes or ("1,2,4" if q else "1,2,4,8"))
    a.batch_reps = a.batch_reps or a.reps
    a.batch_gpu_sizes = _int_list(ap, "--batch-gpu-sizes", a.batch_gpu_sizes)
    a.batch_gpu_ks = _int_list(ap, "--batch-gpu-ks", a.batch_gpu_ks, 2)
    if max(a.batch_cpu_sizes) > a.batch_requests:
        ap.error(f"--batch-cpu-sizes: a batch size above --batch-requests "
                 f"({a.batch_requests}) has no requests to fill it, got {a.batch_cpu_sizes}")
    lo, hi = a.batch_cpu_ks
    if not lo <= hi <= min(a.batch_draft, a.batch_max_new):
        ap.error(f"--batch-cpu-ks: need 1 <= LO <= HI <= min(--batch-draft, --batch-max-new) "
                 f"= {min(a.batch_draft, a.batch_max_new)}, got {lo},{hi}")
    if a.batch_requests < 1 or a.batch_threads < 1 or a.batch_gpu_prompts < 1 \
            or a.batch_ref_prompts < 1 or a.batch_gpu_reps < 1 or a.batch_reps < 1:
        ap.error("--batch-requests, --batch-threads, --batch-gpu-prompts, --batch-ref-prompts, "
                 "--batch-gpu-reps and --batch-reps must be >= 1")
    glo, ghi = a.batch_gpu_ks
    if "batch" in a.suites and not a.cpu_smoke and not glo <= ghi <= a.response:
        ap.error(f"--batch-gpu-ks: need LO <= HI <= --response ({a.response}), got {glo},{ghi}")


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
    if "tp" in b.R:
        from benchmarks.tp import render_md as render_tp
        print(render_tp(b.R["tp"]), flush=True)
    print(f"wrote {os.path.join(a.out, 'results.json')} and results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
