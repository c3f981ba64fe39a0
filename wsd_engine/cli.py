"""`wsd-engine generate | demo | bench` (also `python -m wsd_engine`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DEMO_PROMPT = "Tell me about the quick brown fox."


def _params(a):
    from .engine import WSDParams
    kw = dict(window=a.window, threshold=a.threshold, draft_max_tokens=a.draft_max_tokens,
              max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
              top_k=a.top_k, seed=a.seed, chunk=a.chunk)
    if a.stop is not None:
        kw["stop"] = tuple(a.stop)
    return WSDParams(**kw)


def _add_common(p):
    p.add_argument("--window", type=int, default=6)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--draft-max-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--stop", action="append", default=None,
                   help="a stop string (repeatable; default: [User] [System] [Assistant])")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: "
                   "the checkpoint's)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--backend", default="torch", choices=["torch", "triton"])
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the decode steps (and the chunk scoring) as CUDA graphs "
                        "once, replay them per token (needs --device cuda --backend triton)")
    p.add_argument("--fused-gemv", action="store_true",
                   help="triton backend: one-token matmuls through the gemv kernel with the "
                        "norm / SwiGLU fused in")
    p.add_argument("--pdl", action="store_true",
                   help="triton backend: launch the one-token kernels with programmatic "
                        "dependent launch (sm_90+ GPUs)")
    p.add_argument("--no-tune", action="store_true",
                   help="with --cuda-graphs and neither --fused-gemv nor --pdl, the one-token "
                        "kernels are timed on the GPU and the fastest kept (expected: a few "
                        "seconds per model); this keeps the default kernels instead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _result_dict(r) -> dict:
    return {"text": r.text, "token_ids": r.token_ids, "switch_index": r.switch_index,
            "switched": r.switched, "finish_reason": r.finish_reason,
            "draft_tokens": r.draft_tokens, "base_tokens": r.base_tokens,
            "prompt_tokens": r.prompt_tokens, "timings": r.timings,
            "tokens_per_second": r.tokens_per_second, "rollbacks": r.rollbacks}


def _show(r, as_json: bool, out=None):
    out = out or sys.stdout
    if as_json:
        json.dump(_result_dict(r), out, indent=1)
        out.write("\n")
        return
    color = out.isatty()
    mark = ("\033[1;36m", "\033[0m") if color else ("\u00ab", "\u00bb")
    n = len(r.draft_text)
    drafted, rest = (r.text[:n], r.text[n:]) if r.text.startswith(r.draft_text) else ("", r.text)
    out.write(f"{mark[0]}{drafted}{mark[1]}{rest}\n\n")
    how = "switched" if r.switched else "no window passed; whole draft kept"
    out.write(f"k = {r.switch_index} draft tokens kept ({how}); pilot drafted {r.draft_tokens}, "
              f"base wrote {r.base_tokens}; finish: {r.finish_reason}\n")
    t = r.timings
    out.write("timings (s): " + ", ".join(f"{k} {v:.4f}" for k, v in t.items())
              + f"; {r.tokens_per_second:.1f} tok/s\n")
    if not color:
        out.write("(\u00ab\u00bb marks the pilot's kept draft)\n")


def cmd_generate(a):
    import torch  # noqa: F401
    from .engine import WSD
    from .runner import load_model
    if a.model:
        m = load_model(a.model, device=a.device, dtype=a.dtype, max_seq_len=a.max_seq_len,
                       backend=a.backend)
        m.set_decode_kernels(fused_gemv=a.fused_gemv or None, pdl=a.pdl or None)
        if a.cuda_graphs:
            if m.can_capture and not (a.no_tune or m.decode_kernels_chosen):
                m.tune_decode_kernels()
            m.capture_decode()
        ids = m.tokenizer.encode(a.prompt)
        new = m.generate(ids, max_new_tokens=a.max_new_tokens)
        text = m.tokenizer.decode(new, skip_special_tokens=True)
        print(json.dumps({"text": text, "token_ids": new}) if a.json else text)
        return 0
    if not (a.pilot and a.base):
        print("wsd-engine generate: give --pilot DIR and --base DIR (or --model DIR for plain "
              "decoding with one model)", file=sys.stderr)
        return 2
    wsd = WSD.from_pretrained(a.pilot, a.base, device=a.device, dtype=a.dtype,
                              max_seq_len=a.max_seq_len, backend=a.backend,
                              cuda_graphs=a.cuda_graphs, graph_chunks=(a.chunk,),
                              fused_gemv=a.fused_gemv or None, pdl=a.pdl or None,
                              tune_kernels=False if a.no_tune else None)
    _show(wsd.generate(a.prompt, _params(a)), a.json)
    return 0


def demo_pair(root: str | None = None) -> tuple[str, str]:
    """The built-in tiny synthetic pair (made locally in well under a second), tuned so the
    switch visibly fires with the paper's defaults."""
    from .synthetic import make_wsd_pair
    root = root or os.path.join(tempfile.gettempdir(), "wsd_engine_demo")
    pilot, base = os.path.join(root, "pilot"), os.path.join(root, "base")
    if not (os.path.isfile(os.path.join(pilot, "config.json"))
            and os.path.isfile(os.path.join(base, "config.json"))):
        make_wsd_pair(root, perturb=0.15, damp=0.02, sharpen=100.0, seed=2, readable=True)
    return pilot, base


def cmd_demo(a):
    from .engine import WSD
    pilot, base = demo_pair(a.dir)
    print(f"tiny synthetic pilot and base (random 2-layer Llama models): {pilot}, {base}\n"
          f"prompt: {a.prompt!r}\n", file=sys.stderr if a.json else sys.stdout)
    wsd = WSD.from_pretrained(pilot, base, device=a.device, dtype=a.dtype, backend=a.backend,
                              cuda_graphs=a.cuda_graphs, graph_chunks=(a.chunk,),
                              fused_gemv=a.fused_gemv or None, pdl=a.pdl or None,
                              tune_kernels=False if a.no_tune else None)
    a.draft_max_tokens, a.max_new_tokens = min(a.draft_max_tokens, 128), min(a.max_new_tokens, 160)
    _show(wsd.generate(a.prompt, _params(a)), a.json)
    return 0


def cmd_bench(argv) -> int:
    """`wsd-engine bench ARGS` = `python -m benchmarks.run ARGS`: the benchmark suite lives in
    the source checkout (benchmarks/ next to this package), not in an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        print("wsd-engine bench: benchmarks/ is not part of the installed package; run from a "
              "source checkout (`pip install -e .` there, or `python -m benchmarks.run` in it)",
              file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.run import main as bench_main
    return bench_main(list(argv))


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":          # its own argument parser: forward everything
        return cmd_bench(argv[1:])
    ap = argparse.ArgumentParser(prog="wsd-engine", description="Weak-to-Strong Decoding engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="WSD with a pilot and a base checkpoint folder")
    g.add_argument("--pilot")
    g.add_argument("--base")
    g.add_argument("--model", help="plain greedy decoding with one model instead of WSD")
    g.add_argument("--prompt", required=True)
    _add_common(g)
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo", help="WSD on a built-in tiny synthetic pair (no download)")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--dir", default=None, help="where to write the synthetic pair")
    _add_common(d)
    d.set_defaults(fn=cmd_demo)
    sub.add_parser("bench", help="the benchmark suite, from a source checkout "
                   "(`wsd-engine bench --help`; = python -m benchmarks.run)")
    a = ap.parse_args(argv)
    from .errors import WSDError
    try:
        return a.fn(a)
    except WSDError as e:
        print(f"wsd-engine: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
