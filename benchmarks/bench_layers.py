"""Benchmark: rms_norm (+ fused residual) and swiglu kernels vs torch refs vs torch.compile.

    python benchmarks/bench_layers.py --out layers.json        # CUDA, Llama-3.1-8B shapes
    python benchmarks/bench_layers.py --cpu-smoke              # interpreter, tiny shapes

Shapes (bf16): rms_norm T=1/64, d=4096; swiglu T=1/64, I=14336. GB/s counts the bytes
each op must read + write. At T=1 these ops move tens of kilobytes, so launch latency, not
bandwidth, sets their time. (RoPE has no kernel of its own: the attention kernels apply it;
bench_attention.py times that.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_switch_score import (  # noqa: E402  (helpers shared by the benchmarks)
    copy_bandwidth_gbps,
    device_name,
    maybe_compile,
    print_table,
    run_case,
    setup_backend,
    write_json,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the Triton interpreter")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(ref)")
    args = ap.parse_args(argv)

    device = setup_backend(args.cpu_smoke)
    from wsd_engine.kernels.rms_norm import rms_norm, rms_norm_ref
    from wsd_engine.kernels.swiglu import swiglu, swiglu_ref

    smoke = device.type == "cpu"
    dt = torch.bfloat16
    d, inter = (96, 200) if smoke else (4096, 14336)
    Ts = (1, 7) if smoke else (1, 64)
    eps = 1e-5
    use_compile = not (args.no_compile or smoke)
    c_rms, c_swiglu = (maybe_compile(f, use_compile) for f in (rms_norm_ref, swiglu_ref))
    copy_gbps = copy_bandwidth_gbps(device)
    torch.manual_seed(0)
    rows = []
    for T in Ts:
        x = torch.randn(T, d, device=device).to(dt)                    # [T, d]
        res = torch.randn(T, d, device=device).to(dt)
        w = (1 + 0.1 * torch.randn(d, device=device)).to(dt)           # [d]
        gate_up = torch.randn(T, 2 * inter, device=device).to(dt)      # [T, 2I]

        # validate before timing
        y, h = rms_norm(x, w, eps, residual=res)
        y_ref, h_ref = rms_norm_ref(x, w, eps, residual=res)
        errs = {
            "rms_norm": (y.float() - y_ref.float()).abs().max().item(),
            "swiglu": (swiglu(gate_up).float() - swiglu_ref(gate_up).float()).abs().max().item(),
        }
        print(f"T={T} max abs error vs ref: " + ", ".join(f"{k_}={v:.1e}" for k_, v in errs.items()))

        e = x.element_size()
        cases = [
            (f"rms_norm T={T} d={d}", 2 * T * d * e + d * e, {
                "triton": lambda: rms_norm(x, w, eps),
                "torch_ref": lambda: rms_norm_ref(x, w, eps),
                "torch.compile(ref)": (lambda: c_rms(x, w, eps)) if c_rms else None}),
            (f"rms_norm+residual T={T} d={d}", 4 * T * d * e + d * e, {
                "triton": lambda: rms_norm(x, w, eps, residual=res),
                "torch_ref": lambda: rms_norm_ref(x, w, eps, residual=res),
                "torch.compile(ref)": (lambda: c_rms(x, w, eps, res)) if c_rms else None}),
            (f"swiglu T={T} I={inter}", 3 * T * inter * e, {
                "triton": lambda: swiglu(gate_up),
                "torch_ref": lambda: swiglu_ref(gate_up),
                "torch.compile(ref)": (lambda: c_swiglu(gate_up)) if c_swiglu else None}),
        ]
        for case, nbytes, impls in cases:
            run_case(rows, case, impls, nbytes, copy_gbps, device)
    name = device_name(device)
    print_table(rows, "layer kernels", copy_gbps, name)
    write_json(args.out, dict(benchmark="layers", device=name, copy_gbps=copy_gbps, dtype=str(dt),
                              results=rows, date=time.strftime("%Y-%m-%d")))
    return rows


if __name__ == "__main__":
    main()
