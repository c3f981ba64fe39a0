"""Benchmark: rms_norm (+ fused residual), swiglu and rope kernels vs torch refs vs torch.compile.

    python benchmarks/bench_layers.py --out layers.json        # CUDA, Llama-3.1-8B shapes
    python benchmarks/bench_layers.py --cpu-smoke              # interpreter, tiny shapes

Shapes (bf16): rms_norm T=1/64, d=4096; swiglu T=1/64, I=14336; rope T=1/64, 32 q heads,
8 kv heads, head_dim 128. GB/s counts the bytes each op must read + write. At T=1 these
ops move tens of kilobytes, so launch latency, not bandwidth, sets their time.
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
    from wsd_engine.kernels.rope import rope, rope_ref, rope_tables
    from wsd_engine.kernels.swiglu import swiglu, swiglu_ref

    smoke = device.type == "cpu"
    dt = torch.bfloat16
    d, inter, n_q, n_kv, hd = (96, 200, 4, 2, 64) if smoke else (4096, 14336, 32, 8, 128)
    Ts = (1, 7) if smoke else (1, 64)
    eps = 1e-5
    use_compile = not (args.no_compile or smoke)
    c_rms, c_swiglu, c_rope = (maybe_compile(f, use_compile)
                               for f in (rms_norm_ref, swiglu_ref, rope_ref))
    copy_gbps = copy_bandwidth_gbps(device)
    torch.manual_seed(0)
    cos, sin = rope_tables(hd, 8192, base=500000.0, device=device)     # [8192, hd] fp32
    rows = []
    for T in Ts:
        x = torch.randn(T, d, device=device).to(dt)                    # [T, d]
        res = torch.randn(T, d, device=device).to(dt)
        w = (1 + 0.1 * torch.randn(d, device=device)).to(dt)           # [d]
        gate_up = torch.randn(T, 2 * inter, device=device).to(dt)      # [T, 2I]
        q = torch.randn(T, n_q, hd, device=device).to(dt)              # [T, n_q, hd]
        k = torch.randn(T, n_kv, hd, device=device).to(dt)             # [T, n_kv, hd]
        pos = torch.randperm(8192, device=device)[:T]                  # distinct positions
        v = torch.randn(T, n_kv, hd, device=device).to(dt)
        kc = torch.randn(n_kv, 8192, hd, device=device).to(dt)         # one layer's cache slab
        vc = torch.randn(n_kv, 8192, hd, device=device).to(dt)

        def rope_then_copy():      # the decode step before the fused write: three launches
            qo_, ko_ = rope(q, k, cos, sin, pos)
            kc.index_copy_(1, pos, ko_.transpose(0, 1))
            vc.index_copy_(1, pos, v.transpose(0, 1))

        # validate before timing
        y, h = rms_norm(x, w, eps, residual=res)
        y_ref, h_ref = rms_norm_ref(x, w, eps, residual=res)
        qo, ko = rope(q, k, cos, sin, pos)
        qr, kr = rope_ref(q, k, cos, sin, pos)
        errs = {
            "rms_norm": (y.float() - y_ref.float()).abs().max().item(),
            "swiglu": (swiglu(gate_up).float() - swiglu_ref(gate_up).float()).abs().max().item(),
            "rope": max((qo.float() - qr.float()).abs().max().item(),
                        (ko.float() - kr.float()).abs().max().item()),
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
            (f"rope T={T} {n_q}/{n_kv}x{hd}", 2 * T * (n_q + n_kv) * hd * e + 2 * T * hd * 4 * 2, {
                "triton": lambda: rope(q, k, cos, sin, pos),
                "triton inplace": lambda: rope(q, k, cos, sin, pos, inplace=True),
                "torch_ref": lambda: rope_ref(q, k, cos, sin, pos),
                "torch.compile(ref)": (lambda: c_rope(q, k, cos, sin, pos)) if c_rope else None}),
            (f"rope+kv cache write T={T} {n_q}/{n_kv}x{hd}",
             2 * T * (n_q + 2 * n_kv) * hd * e + 2 * T * hd * 4 * 2, {
                 "triton fused": lambda: rope(q, k, cos, sin, pos, k_cache=kc, v=v, v_cache=vc),
                 "triton rope + 2 index_copy": rope_then_copy}),
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
