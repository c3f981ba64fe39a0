"""Benchmark: the fused batch-1 `gemv` kernel against what the triton backend runs without it
(the separate RMSNorm / SwiGLU kernel, then cuBLAS `F.linear`) and against `F.linear` alone.

    python benchmarks/bench_gemv.py --out gemv.json           # CUDA, Llama-3.1-8B shapes
    python benchmarks/bench_gemv.py --sweep                   # + launch shapes of the kernel
    python benchmarks/bench_gemv.py --cpu-smoke               # interpreter, tiny shapes

Each matmul of a decode step, at Llama-3.1-8B shapes in bf16: qkv (norm + residual
before it), o, gate_up (norm + residual), down (SwiGLU before it), lm_head (final norm,
fp32 logits). Every implementation cycles through enough copies of the weight that they
do not fit in L2 (a decode step reads each weight once, from HBM). GB/s counts the weight
bytes plus the activations read and written; the floor is the weight read at the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_switch_score import (  # noqa: E402  (helpers shared by the benchmarks)
    copy_bandwidth_gbps,
    device_name,
    print_table,
    run_case,
    setup_backend,
    write_json,
)

L2_BYTES = 256 << 20            # cycle through at least this many weight bytes per timing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the Triton interpreter")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    args = ap.parse_args(argv)

    device = setup_backend(args.cpu_smoke)
    from wsd_engine.kernels.gemv import default_config, gemv
    from wsd_engine.kernels.rms_norm import rms_norm
    from wsd_engine.kernels.swiglu import swiglu

    smoke = device.type == "cpu"
    dt = torch.bfloat16
    d, inter, vocab, qkv_n = (96, 200, 1000, 160) if smoke else (4096, 14336, 128256, 6144)
    eps = 1e-5
    copy_gbps = copy_bandwidth_gbps(device)
    torch.manual_seed(0)
    F = torch.nn.functional
    e = 2
    cases = [("qkv", qkv_n, d, "rmsnorm"), ("o", d, d, "none"),
             ("gate_up", 2 * inter, d, "rmsnorm"), ("down", d, inter, "swiglu"),
             ("lm_head", vocab, d, "rmsnorm")]
    rows, sweep_rows = [], []
    dev_name = device_name(device)

    def payload(done: bool) -> dict:
        return dict(benchmark="gemv", device=dev_name, copy_gbps=copy_gbps, dtype=str(dt),
                    results=rows, sweep=sweep_rows, complete=done,
                    date=time.strftime("%Y-%m-%d"))
    for name, N, K, pre in cases:
        n_copies = 1 if smoke else max(1, -(-L2_BYTES // (N * K * e)))
        ws = [(torch.randn(N, K, device=device) / K ** 0.5).to(dt) for _ in range(n_copies)]
        x = torch.randn(1, 2 * K if pre == "swiglu" else K, device=device).to(dt)
        res = torch.randn(1, K, device=device).to(dt) if pre == "rmsnorm" else None
        nw = (1 + 0.1 * torch.randn(K, device=device)).to(dt) if pre == "rmsnorm" else None
        logits = name == "lm_head"

        def fused(w, cfg=None):
            return gemv(x, w, pre=pre, residual=res, norm_weight=nw, eps=eps, logits=logits,
                        config=cfg)

        def unfused(w):
            if pre == "rmsnorm":
                a, _ = rms_norm(x, nw, eps, residual=res)
            elif pre == "swiglu":
                a = swiglu(x)
            else:
                a = x
            y = F.linear(a, w)
            return y.float() if logits else y

        # check before timing: fused against the unfused chain
        a_out, b_out = fused(ws[0]), unfused(ws[0])
        a_out = a_out[0] if isinstance(a_out, tuple) else a_out
        err = ((a_out.float() - b_out.float()).abs().max() / b_out.float().abs().max()).item()
        print(f"{name}: max |fused - unfused| / max |unfused| = {err:.2e}")

        def cycle(fn):
            return lambda: [fn(w) for w in ws]
        act = x.numel() * e + (3 * K * e if res is not None else 0) + N * (4 if logits else e)
        nbytes = (N * K * e + act) * n_copies
        label = f"{name} N={N} K={K} pre={pre}"
        impls = {"gemv fused": cycle(fused), "norm/swiglu kernel + F.linear": cycle(unfused),
                 "F.linear alone": cycle(lambda w: F.linear(x[:, :K], w))}
        run_case(rows, label, impls, nbytes, copy_gbps, device,
                 ref_name="norm/swiglu kernel + F.linear")
        if args.sweep and not smoke:
            # num_stages 1: the weight loop unpipelined (one tile in flight per program)
            grid = itertools.product((8, 16, 32), (256, 512), (4, 8), (1, 3))
            best = None
            for bn, bk, nw_, ns in grid:
                cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw_, "num_stages": ns}
                sub = []
                run_case(sub, label, {str(cfg): cycle(lambda w, c=cfg: fused(w, c))}, nbytes,
                         copy_gbps, device)
                r = sub[0]
                r["config"] = cfg
                sweep_rows.append(r)
                if r["ms"] and (best is None or r["ms"] < best["ms"]):
                    best = r
            if best:
                print(f"{name}: best {best['config']} {best['ms'] * 1e3:.1f} us "
                      f"({100 * best['frac_copy']:.1f}% of copy BW); default "
                      f"{default_config(N, K)}")
        if args.out:   # after every shape: a run cut short by a time limit keeps what it has
            with open(args.out, "w") as f:
                json.dump(payload(False), f, indent=2)
    print_table(rows, "gemv (batch 1, bf16)", copy_gbps, dev_name)
    write_json(args.out, payload(True))
    return rows


if __name__ == "__main__":
    main()
