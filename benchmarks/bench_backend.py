"""The whole forward at real shapes: backend "triton" against backend "torch".

    python benchmarks/bench_backend.py --preset llama3.1-8b --out backend.json   # CUDA
    python benchmarks/bench_backend.py --cpu-smoke                               # tiny, CPU

Random bf16 weights made on the device (never zeros). Checks that the triton backend's
logits agree with the torch backend's within bf16 tolerance and that greedy tokens agree;
times one eager decode step and one 8-token chunk-scoring forward per backend, against the
floor (weight bytes / copy bandwidth measured in the same run). These are eager steps
(Python launches every kernel); CUDA graphs are a separate step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

try:
    from benchmarks.bench_switch_score import copy_bandwidth_gbps, setup_backend, time_ms
    from benchmarks.common import weight_bytes
except ImportError:  # run as a script from benchmarks/
    from bench_switch_score import copy_bandwidth_gbps, setup_backend, time_ms
    from common import weight_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    dev = setup_backend(a.cpu_smoke)
    from wsd_engine.config import preset_config
    from wsd_engine.loading import build_model, random_model

    cfg = preset_config(a.preset)
    dtype = torch.bfloat16
    if a.cpu_smoke:   # 2 layers, small vocab: the interpreter is slow
        cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=1000, hidden_size=256,
                                  intermediate_size=512, num_heads=4, num_kv_heads=2,
                                  head_dim=64)
        dtype, a.prompt_len, a.gen = torch.float32, 16, 4
    ref = random_model(cfg, dev, dtype, max_seq_len=a.prompt_len + a.gen + 16, backend="torch")
    tri = build_model(cfg, ref.weights, dev, dtype, ref.max_seq_len, backend="triton")
    wbytes = weight_bytes(ref)
    bw = copy_bandwidth_gbps(dev)
    floor_ms = wbytes / (bw * 1e9) * 1e3
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.prompt_len,), device=dev, generator=g)

    lr, lt = ref.score(ids), tri.score(ids)                                 # [T, V] fp32
    rel = ((lr - lt).abs().max() / lr.abs().max()).item()
    agree = (lr.argmax(-1) == lt.argmax(-1)).float().mean().item()
    # Both bf16 backends against the same weights run in fp32 (torch backend): the triton
    # backend's error should be of the size of the torch backend's own bf16 error.
    w32 = {n: t.float() for n, t in ref.weights.items()}
    l32 = build_model(cfg, w32, dev, torch.float32, ref.max_seq_len, backend="torch").score(ids)
    del w32
    scale = l32.abs().max()
    err_vs_fp32 = {"torch_bf16": ((lr - l32).abs().max() / scale).item(),
                   "triton_bf16": ((lt - l32).abs().max() / scale).item(),
                   "torch_bf16_argmax_agree": (lr.argmax(-1) == l32.argmax(-1)).float().mean().item(),
                   "triton_bf16_argmax_agree": (lt.argmax(-1) == l32.argmax(-1)).float().mean().item()}
    del l32
    gr = ref.generate(ids, a.gen, stop_at_eos=False)
    gt = tri.generate(ids, a.gen, stop_at_eos=False)
    same_prefix = next((i for i, (x, y) in enumerate(zip(gr, gt)) if x != y), len(gr))

    res = {"preset": a.preset, "device": torch.cuda.get_device_name() if dev.type == "cuda"
           else "cpu", "dtype": str(dtype), "weight_bytes": wbytes, "copy_gbps": bw,
           "floor_ms_per_step": floor_ms, "logits_max_rel_diff": rel, "argmax_agree": agree,
           "max_rel_err_vs_fp32": err_vs_fp32,
           "greedy_identical_prefix": same_prefix, "greedy_len": len(gr)}
    chunk = ids[:8]
    for name, m in (("torch", ref), ("triton", tri)):
        m.cache.reset()
        m.prefill(ids)
        P = a.prompt_len
        tok = ids[-1:]

        def step():
            m.cache.length = P
            m.decode_one_token(tok)

        def score8():
            m.cache.length = P
            m.forward(chunk, P, return_hidden=True)

        d_ms = time_ms(step, dev, reps=50)
        s_ms = time_ms(score8, dev, reps=50)
        res[name] = {"decode_ms": d_ms, "decode_frac_of_floor": floor_ms / d_ms,
                     "score8_ms": s_ms, "score8_over_decode": s_ms / d_ms}
    if dev.type == "cuda":   # the triton decode step as a CUDA graph (the chunk scoring
        tri.capture_decode()   # has none: the engine scores eagerly)
        tri.prefill(ids)
        P, tok = a.prompt_len, ids[-1:]

        def graph_step():
            tri.cache.length = P
            tri.decode_one_token(tok)
        g_ms = time_ms(graph_step, dev, reps=50)
        res["triton_graph"] = {"decode_ms": g_ms, "decode_frac_of_floor": floor_ms / g_ms,
                               "tok_per_s": 1e3 / g_ms}
    print(json.dumps(res, indent=1))
    print(f"\n| backend | decode ms | fraction of floor ({floor_ms:.2f} ms) | chunk-8 ms | "
          "chunk-8 / decode |\n|---|---|---|---|---|")
    for name in ("torch", "triton", "triton_graph"):
        if name not in res:
            continue
        r = res[name]
        print(f"| {name} | {r['decode_ms']:.3f} | {r['decode_frac_of_floor']:.2f} | "
              f"{r.get('score8_ms', float('nan')):.3f} | "
              f"{r.get('score8_over_decode', float('nan')):.2f} |")
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)
    return res


if __name__ == "__main__":
    main()
