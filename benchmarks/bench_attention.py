"""Attention kernels at Llama-3.1-8B shapes (bf16, n_q=32, n_kv=8, hd=128) vs torch.

    python -m benchmarks.bench_attention [--out attn.json] [--sweep]   # CUDA
    python -m benchmarks.bench_attention --cpu-smoke                    # interpreter, tiny
    python -m benchmarks.bench_attention --compile-check   # sm_90 AOT, no GPU (compile_check.py)

Timing: every implementation runs once per layer of a multi-layer cache (>= 256 MiB of K/V in
all, so the 50 MB L2 of an H100 cannot hold it, as in a real forward), the whole sweep
captured in one CUDA graph (the engine replays graphs; this removes Python launch overhead,
~20 us per Triton launch, which would otherwise dominate a 10 us kernel); median of
replays / n_layers. Implementations that cannot be captured are timed eagerly ("eager").
Decode bandwidth counts the K/V bytes read (n_kv * ctx * hd * 2 B * 2) and is reported as a
fraction of a device-to-device copy measured in the same run (1 GiB, bytes read + written).
Baselines: PyTorch SDPA (bf16, GQA-native; for prefill with RoPE and the cache write as torch
ops), the fp32 torch reference, and torch.compile of the reference (recompiled per shape, so
at 8k context and prefill L = 64 only; every length with --sweep).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_switch_score import copy_bandwidth_gbps  # noqa: E402  (shared by the benchmarks)

N_Q, N_KV, HD = 32, 8, 128          # Llama-3.1-8B attention
# 8192 first (the target length), then 256 (the engine's short-answer decode): a run cut
# short by a time limit keeps the rows that matter most (the JSON is written as rows come)
DECODE_CTX = (8192, 256, 32768, 1024, 4096)
COMPILE_CTX = (8192,)   # torch.compile(ref) recompiles per length (~10 s each): 8k only
COMPILE_L = (64,)       # ... and per prefill length: one middle length (all with --sweep)
PREFILL_L = (8, 64, 512)
PREFILL_PREFIX = 1024
L2_DEFEAT_BYTES = 256 << 20


def _kernels():
    # Imported late: --cpu-smoke must set TRITON_INTERPRET before the kernels are decorated.
    from wsd_engine.kernels import decode_attention as dec
    from wsd_engine.kernels import prefill_attention as pre
    return dec, pre


# ---------------------------------------------------------------------------- timing
def time_per_call(calls, reps=30, graph=True):
    """Median microseconds per call of `calls` (one zero-arg callable per layer)."""
    for c in calls:   # warm-up (compiles)
        c()
    if not torch.cuda.is_available():   # --cpu-smoke: wall clock of the interpreter
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls), "cpu-interpreter"
    torch.cuda.synchronize()
    run, method = (lambda: [c() for c in calls]), "eager"
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in calls:
                    c()
            run, method = g.replay, "graph"
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, say so
            print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)",
                  file=sys.stderr)
            torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times), method


def n_layers_for(bytes_per_layer, device):
    if device == "cpu":
        return 1
    return max(2, min(64, math.ceil(L2_DEFEAT_BYTES / bytes_per_layer)))


# ---------------------------------------------------------------------------- baselines
def sdpa_decode(q, k_cache, v_cache, n):
    """bf16 SDPA (GQA-native) of one token over cache[:, :n]: the fair torch baseline."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, None, :], k_cache[None, :, :n], v_cache[None, :, :n], enable_gqa=True)
    return o[0, :, 0]                                                   # [n_q, hd]


def sdpa_prefill(q, k, v, k_cache, v_cache, cos, sin, start, bias):
    """Torch prefill as a model would do it: bf16 RoPE (HF), cache write, flash SDPA with a
    lower-right causal bias (queries are the last L of start+L keys)."""
    L = q.shape[0]
    c = cos[start:start + L, None].to(q.dtype)                          # [L, 1, hd]
    s = sin[start:start + L, None].to(q.dtype)
    half = q.shape[-1] // 2

    def rot(x):
        return torch.cat((-x[..., half:], x[..., :half]), -1)
    qr, kr = q * c + rot(q) * s, k * c + rot(k) * s
    k_cache[:, start:start + L] = kr.transpose(0, 1)
    v_cache[:, start:start + L] = v.transpose(0, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(0, 1)[None], k_cache[None, :, :start + L], v_cache[None, :, :start + L],
        attn_mask=bias, enable_gqa=True)                                # [1, n_q, L, hd]
    return o[0].transpose(0, 1)


# ---------------------------------------------------------------------------- benches
@dataclass(frozen=True)
class Setup:
    n_q: int = N_Q
    n_kv: int = N_KV
    hd: int = HD
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"


def bench_decode(dec, su: Setup, copy_gbps, ctxs, sweep=False, rows=None, checkpoint=None):
    from wsd_engine.kernels._common import rope_ref, rope_tables
    rows = [] if rows is None else rows
    on_gpu = su.device == "cuda"
    for ctx in ctxs:
        kv_bytes = su.n_kv * ctx * su.hd * su.dtype.itemsize * 2
        n_layers = n_layers_for(kv_bytes, su.device)
        cache = torch.randn(n_layers, 2, su.n_kv, ctx, su.hd, device=su.device, dtype=su.dtype)
        q = torch.randn(su.n_q, su.hd, device=su.device, dtype=su.dtype)          # [n_q, hd]
        n_t = torch.tensor([ctx], dtype=torch.int32, device=su.device)
        want = dec.decode_attention_ref(q, cache[0, 0], cache[0, 1], ctx)     # [n_q, hd]
        impls = {
            "triton": lambda i: dec.decode_attention(q, cache[i, 0], cache[i, 1], n_t),
            "triton_fused": lambda i: dec.decode_attention(q, cache[i, 0], cache[i, 1], n_t,
                                                           fused_combine=True),
            "triton_int_len": lambda i: dec.decode_attention(q, cache[i, 0], cache[i, 1], ctx),
            "sdpa": lambda i: sdpa_decode(q, cache[i, 0], cache[i, 1], ctx),
            "ref_fp32": lambda i: dec.decode_attention_ref(q, cache[i, 0], cache[i, 1], ctx),
        }
        # the decode step's append mode: q / new k unrotated, RoPE + cache write + attention
        # in one launch, against torch RoPE + cache write followed by attention
        cos, sin = rope_tables(su.hd, ctx, base=500000.0, device=su.device)
        kn = torch.randn(su.n_kv, su.hd, device=su.device, dtype=su.dtype)
        vn = torch.randn(su.n_kv, su.hd, device=su.device, dtype=su.dtype)
        p_t = torch.tensor([ctx - 1], device=su.device)
        qr, kr = rope_ref(q[None], kn[None], cos, sin, p_t)
        ref0 = cache[0].clone()
        ref0[0][:, ctx - 1], ref0[1][:, ctx - 1] = kr[0], vn
        want_append = dec.decode_attention_ref(qr[0], ref0[0], ref0[1], ctx)
        del ref0

        def rope_write_then_attend(i):
            q2, k2 = rope_ref(q[None], kn[None], cos, sin, p_t)
            cache[i, 0][:, ctx - 1], cache[i, 1][:, ctx - 1] = k2[0], vn
            return dec.decode_attention(q2[0], cache[i, 0], cache[i, 1], n_t)
        impls["triton_append (one launch)"] = lambda i: dec.decode_attention(
            q, cache[i, 0], cache[i, 1], n_t, k_new=kn, v_new=vn, cos=cos, sin=sin)
        impls["torch rope+write, then triton"] = rope_write_then_attend
        # the engine's cache is longer than the context: its graph-captured step launches
        # the piece count of the whole cache (32 on a 132-SM card) at every length; min_piece
        # decides how many of those pieces a short context uses (0 = all of them)
        eng_splits = dec.default_num_splits(su.n_kv, 1 << 15, 64, torch.device(su.device))
        mps = [0, None] + ([64, 128, 256, 512] if sweep else [])
        for mp in mps:
            label = "default" if mp is None else mp
            impls[f"triton_append[splits={eng_splits},min_piece={label}]"] = (
                lambda i, mp=mp: dec.decode_attention(
                    q, cache[i, 0], cache[i, 1], n_t, k_new=kn, v_new=vn, cos=cos, sin=sin,
                    num_splits=eng_splits, min_piece=mp))
        # programmatic dependent launch: each layer's call starts while the previous ends
        # (and, before its wait, an L2 prefetch of the first key blocks of its piece)
        for pf in (0, None, 4):
            impls[f"triton_append[splits={eng_splits},min_piece=default,pdl,"
                  f"prefetch={'default' if pf is None else pf}]"] = (
                lambda i, pf=pf: dec.decode_attention(
                    q, cache[i, 0], cache[i, 1], n_t, k_new=kn, v_new=vn, cos=cos, sin=sin,
                    num_splits=eng_splits, pdl=True, prefetch_tiles=pf))
        appends = tuple(n for n in impls if n.startswith("triton_append")) + (
            "torch rope+write, then triton",)
        if on_gpu and (sweep or ctx in COMPILE_CTX):   # inductor on CPU: minutes; GPU only
            compiled = torch.compile(dec.decode_attention_ref, dynamic=False)
            impls["compile(ref)"] = lambda i: compiled(q, cache[i, 0], cache[i, 1], ctx)
        if sweep and on_gpu:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for bn in (32, 64, 128):
                for stages in (2, 3, 4):
                    for per_sm in (0.5, 1, 2, 4, 8):
                        ns = max(1, min(math.ceil(per_sm * sms / su.n_kv), math.ceil(ctx / bn)))
                        impls[f"triton[bn={bn},st={stages},splits={ns}]"] = (
                            lambda i, bn=bn, st=stages, ns=ns: dec.decode_attention(
                                q, cache[i, 0], cache[i, 1], n_t, num_splits=ns, block_n=bn,
                                num_stages=st))
            for bn in (64, 128):   # one launch: combine in the last program per kv head
                for per_sm in (1, 2):
                    ns = max(2, min(math.ceil(per_sm * sms / su.n_kv), math.ceil(ctx / bn)))
                    impls[f"triton_fused[bn={bn},st=3,splits={ns}]"] = (
                        lambda i, bn=bn, ns=ns: dec.decode_attention(
                            q, cache[i, 0], cache[i, 1], n_t, num_splits=ns, block_n=bn,
                            num_stages=3, fused_combine=True))
        for name, fn in impls.items():
            try:
                w = want_append if name in appends else want
                err = (fn(0).float() - w.float()).abs().max().item()
                us, method = time_per_call([lambda i=i, fn=fn: fn(i) for i in range(n_layers)])
            except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
                print(f"  decode ctx={ctx} {name}: failed ({type(e).__name__}: {e})",
                      file=sys.stderr)
                continue
            gbps = kv_bytes / (us * 1e-6) / 1e9
            rows.append(dict(op="decode", ctx=ctx, impl=name, us=us, gbps=gbps,
                             frac_copy=gbps / copy_gbps, method=method, max_abs_err=err))
        cache = None   # free this length's K/V before the next (the closures are done)
        if checkpoint:
            checkpoint()
    return rows


def bench_prefill(pre, su: Setup, Ls, prefix, sweep=False, rows=None, checkpoint=None):
    from torch.nn.attention.bias import causal_lower_right

    from wsd_engine.kernels._common import rope_tables
    rows = [] if rows is None else rows
    dev = su.device
    max_seq = prefix + max(Ls)
    cos, sin = rope_tables(su.hd, max_seq, base=500000.0, device=dev)
    for L in Ls:
        n_layers = n_layers_for(su.n_kv * (prefix + L) * su.hd * su.dtype.itemsize * 2, dev)
        cache = torch.randn(n_layers, 2, su.n_kv, max_seq, su.hd, device=dev, dtype=su.dtype)
        q = torch.randn(L, su.n_q, su.hd, device=dev, dtype=su.dtype)           # [L, n_q, hd]
        k = torch.randn(L, su.n_kv, su.hd, device=dev, dtype=su.dtype)
        v = torch.randn(L, su.n_kv, su.hd, device=dev, dtype=su.dtype)
        pos = torch.tensor([prefix], dtype=torch.int64, device=dev)
        ref_cache = cache[0].clone()
        want = pre.prefill_attention_ref(q, k, v, ref_cache[0], ref_cache[1], cos, sin, prefix)
        bias = causal_lower_right(L, prefix + L)
        mask = torch.ones(L, prefix + L, dtype=torch.bool, device=dev).tril(prefix)  # [L, P+L]
        flops = 4 * su.n_q * su.hd * L * (prefix + (L + 1) / 2)          # QK^T + PV, causal
        impls = {
            "triton": lambda i: pre.prefill_attention(q, k, v, cache[i, 0], cache[i, 1],
                                                      cos, sin, pos),
            "triton_int_pos": lambda i: pre.prefill_attention(q, k, v, cache[i, 0], cache[i, 1],
                                                              cos, sin, prefix),
            "sdpa_lower_right": lambda i: sdpa_prefill(q, k, v, cache[i, 0], cache[i, 1],
                                                       cos, sin, prefix, bias),
            "sdpa_mask": lambda i: sdpa_prefill(q, k, v, cache[i, 0], cache[i, 1],
                                                cos, sin, prefix, mask),
            "ref_fp32": lambda i: pre.prefill_attention_ref(q, k, v, cache[i, 0], cache[i, 1],
                                                            cos, sin, prefix),
        }
        if dev == "cuda" and (sweep or L in COMPILE_L):   # inductor on CPU: minutes
            compiled = torch.compile(pre.prefill_attention_ref, dynamic=False)
            impls["compile(ref)"] = lambda i: compiled(q, k, v, cache[i, 0], cache[i, 1],
                                                       cos, sin, prefix)
        if sweep and dev == "cuda":
            for bn in (64, 128):
                for nw in (4, 8):
                    for st in (2, 3):
                        for ns in (1, 4):
                            impls[f"triton[bn={bn},w={nw},st={st},splits={ns}]"] = (
                                lambda i, bn=bn, nw=nw, st=st, ns=ns: pre.prefill_attention(
                                    q, k, v, cache[i, 0], cache[i, 1], cos, sin, pos,
                                    block_n=bn, num_warps=nw, num_stages=st, num_splits=ns))
        for name, fn in impls.items():
            try:   # (every impl rewrites the same new positions; the prefix it reads is fixed)
                err = (fn(0).float() - want.float()).abs().max().item()
                us, method = time_per_call([lambda i=i, fn=fn: fn(i) for i in range(n_layers)])
            except Exception as e:  # noqa: BLE001
                print(f"  prefill L={L} {name}: failed ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            rows.append(dict(op="prefill", L=L, prefix=prefix, impl=name, us=us,
                             tflops=flops / (us * 1e-6) / 1e12, method=method, max_abs_err=err))
        cache = None   # free this length's K/V before the next (the closures are done)
        if checkpoint:
            checkpoint()
    return rows


def print_table(title, rows, copy_gbps):
    print(f"\n{title}\ndevice-to-device copy: {copy_gbps:.0f} GB/s (read + write)\n")
    dec = sorted((r for r in rows if r["op"] == "decode"), key=lambda r: r["ctx"])  # stable
    if dec:
        print("| decode ctx | impl | us | K/V GB/s | of copy BW | timing | max abs err |")
        print("|---:|---|---:|---:|---:|---|---:|")
        for r in dec:
            print(f"| {r['ctx']} | {r['impl']} | {r['us']:.1f} | {r['gbps']:.0f} | "
                  f"{r['frac_copy']:.0%} | {r['method']} | {r['max_abs_err']:.1e} |")
    pre = [r for r in rows if r["op"] == "prefill"]
    if pre:
        print("\n| prefill L @ prefix | impl | us | TFLOP/s | timing | max abs err |")
        print("|---:|---|---:|---:|---|---:|")
        for r in pre:
            print(f"| {r['L']} @ {r['prefix']} | {r['impl']} | {r['us']:.1f} | "
                  f"{r['tflops']:.3g} | {r['method']} | {r['max_abs_err']:.1e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes under the Triton interpreter: the same code paths, no "
                         "timing claims")
    ap.add_argument("--sweep", action="store_true",
                    help="also time block-size / split variants (tuning on a new GPU)")
    ap.add_argument("--ctx", type=int, nargs="*", help=f"decode contexts (default {DECODE_CTX})")
    ap.add_argument("--L", type=int, nargs="*", help=f"prefill lengths (default {PREFILL_L})")
    ap.add_argument("--compile-check", action="store_true",
                    help="compile the default configs for sm_90 (no GPU needed): smem, regs, "
                         "spills")
    args = ap.parse_args(argv)
    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("bench_attention: --compile-check needs TRITON_INTERPRET unset", file=sys.stderr)
            return 2
        from benchmarks.compile_check import main as compile_main
        return compile_main(["--only", "attention"])

    if args.cpu_smoke:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        su = Setup(n_q=8, n_kv=2, hd=64, dtype=torch.float32,
                   device="cuda" if torch.cuda.is_available() else "cpu")
        ctxs, Ls, prefix = args.ctx or [77], args.L or [7], 77
        title = f"smoke ({su.device}, Triton interpreter): n_q=8, n_kv=2, hd=64, fp32"
    else:
        if not torch.cuda.is_available():
            print("bench_attention: needs a CUDA GPU; use --cpu-smoke on a CPU-only machine",
                  file=sys.stderr)
            return 2
        su = Setup()
        ctxs, Ls = args.ctx or DECODE_CTX, args.L or PREFILL_L
        prefix = PREFILL_PREFIX
        title = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
                 f"n_q={su.n_q}, n_kv={su.n_kv}, hd={su.hd} (Llama-3.1-8B)")
    dec, pre = _kernels()
    copy_gbps = copy_bandwidth_gbps(torch.device(su.device))
    rows: list[dict] = []
    tol = 1e-4 if su.dtype == torch.float32 else 5e-2

    def save(complete=False):
        ok = all(r["max_abs_err"] < tol for r in rows if r["impl"].startswith("triton"))
        if args.out:   # after every length, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(dict(title=title, torch=torch.__version__, copy_gbps=copy_gbps,
                               rows=rows, ok=ok, complete=complete), f, indent=1)
        return ok
    bench_decode(dec, su, copy_gbps, ctxs, args.sweep, rows=rows, checkpoint=save)
    bench_prefill(pre, su, Ls, prefix, args.sweep, rows=rows, checkpoint=save)
    print_table(title, rows, copy_gbps)
    ok = save(complete=True)
    if not ok:
        print("bench_attention: a Triton result disagrees with its reference", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
