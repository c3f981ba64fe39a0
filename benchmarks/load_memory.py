"""Peak host memory of `load_model` on a ~1 GB bf16 checkpoint (random weights, 2 shards).

    python -m benchmarks.load_memory [--dir /tmp/wsd_1gb] [--size-gb 1.0]
    python -m benchmarks.load_memory --tp 1,2,4 [--dir /tmp/wsd_tp_fp32] [--json out.json]

--tp: host memory per rank of a tensor-parallel load on CPU (gloo). A ~320 MB fp32 Llama
checkpoint (4 layers, hidden 1024, 16 heads / 8 KV heads, ffn 2816, vocab 16384; written by
transformers through `wsd_engine.synthetic.make_model`, no tokenizer) is loaded with
`load_model(path, tensor_parallel=N)` in a fresh subprocess per N (so peaks do not mix);
`Model.rank_load_memory()` gives each rank's RSS when its load began ("before"), after it
and its process's peak (VmHWM). Per rank: peak - before (what loading added at its
peak) and rss - before, as a ratio to the N = 1 load. Every weight is split (the embedding
and lm_head by vocabulary rows), so ~1/N of the model per rank is expected, on top of each
process's baseline (torch imported: the "before").

The checkpoint is written tensor by tensor with safetensors (no model object in memory);
the load is measured in a fresh subprocess by its peak RSS (ru_maxrss). The target: peak
about the model's size plus one shard, never the model twice.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HIDDEN, INTER, HEADS, KV, VOCAB = 2048, 5632, 16, 4, 32000


def write_checkpoint(out: str, size_gb: float) -> int:
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    per_layer = (HIDDEN * HIDDEN * 2 + 2 * HIDDEN * (HIDDEN // HEADS * KV) + 3 * HIDDEN * INTER
                 + 2 * HIDDEN) * 2
    fixed = 2 * VOCAB * HIDDEN * 2
    layers = max(1, int((size_gb * 2**30 - fixed) / per_layer))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "rope_theta": 500000.0, "dtype": "bfloat16",
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    hd = HIDDEN // HEADS
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rnd(VOCAB, HIDDEN), "model.norm.weight": rnd(HIDDEN)},
              {"lm_head.weight": rnd(VOCAB, HIDDEN)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[i * 2 // layers][p + "self_attn.q_proj.weight"] = rnd(HIDDEN, HIDDEN)
        s = shards[i * 2 // layers]
        s[p + "self_attn.k_proj.weight"] = rnd(KV * hd, HIDDEN)
        s[p + "self_attn.v_proj.weight"] = rnd(KV * hd, HIDDEN)
        s[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        s[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        s[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        s[p + "input_layernorm.weight"] = rnd(HIDDEN)
        s[p + "post_attention_layernorm.weight"] = rnd(HIDDEN)
    weight_map, total = {}, 0
    for n, s in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, os.path.join(out, name), metadata={"format": "pt"})
        for k, t in s.items():
            weight_map[k] = name
            total += t.numel() * 2
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"))
    return total


# VmHWM (peak resident set of this process image) rather than ru_maxrss, which Linux
# carries over from the parent across exec.
_CHILD = """
import sys, torch, wsd_engine
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
base = hwm()
m = wsd_engine.load_model(sys.argv[1], dtype=torch.bfloat16, max_seq_len=256)
print(base, hwm())
"""


# TP_SHAPES: the --tp checkpoint (transformers LlamaConfig fields), ~80M parameters
TP_SHAPES = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=16384,
                 max_position_embeddings=4096)

_TP_CHILD = """
import json, sys, torch, wsd_engine
n = int(sys.argv[2])
with wsd_engine.load_model(sys.argv[1], tensor_parallel=n, max_seq_len=256) as m:
    print("RANKS", json.dumps(m.rank_load_memory()))
"""


def write_tp_checkpoint(out: str, **shapes) -> int:
    """The --tp checkpoint (fp32, one safetensors file unless transformers shards it);
    returns its weight bytes. Reused when out already holds one of the same shapes."""
    from wsd_engine.synthetic import make_model
    kw = dict(TP_SHAPES, **shapes)
    stamp = os.path.join(out, "bench_shapes.json")
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == kw):
        make_model(out, "llama", seed=0, dtype=torch.float32, **kw)
        json.dump(kw, open(stamp, "w"))
    return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
               if f.endswith(".safetensors"))


def measure_tp(path: str, sizes, model_bytes: int, timeout: float = 600.0) -> dict:
    """{N: per-rank host memory of load_model(path, tensor_parallel=N)}, one fresh
    subprocess per N, with ratios to the N = 1 load (rank 0's peak - before)."""
    res = {"model_bytes": model_bytes, "by_n": {}}
    for n in sizes:
        r = subprocess.run([sys.executable, "-c", _TP_CHILD, path, str(n)], capture_output=True,
                           text=True, timeout=timeout)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RANKS ")), None)
        if r.returncode != 0 or line is None:
            res["by_n"][str(n)] = {"error": (r.stderr or r.stdout)[-2000:]}
            continue
        ranks = []
        for i, m in enumerate(json.loads(line[6:])):
            ranks.append({"rank": i, "before": m["before"], "rss": m["rss"], "peak": m["peak"],
                          "peak_minus_before": m["peak"] - m["before"],
                          "rss_minus_before": m["rss"] - m["before"]})
        res["by_n"][str(n)] = {"ranks": ranks,
                               "max_peak_minus_before": max(x["peak_minus_before"] for x in ranks)}
    one = res["by_n"].get("1", {}).get("max_peak_minus_before")
    for e in res["by_n"].values():
        for x in e.get("ranks", []):
            x["peak_over_model"] = x["peak_minus_before"] / model_bytes
            if one:
                x["peak_ratio_to_n1"] = x["peak_minus_before"] / one
    return res


def tp_table(res: dict) -> str:
    mb = 1e6
    lines = [f"model (fp32 safetensors): {res['model_bytes'] / mb:.0f} MB",
             "| N | rank | before MB | peak - before MB | rss - before MB | "
             "peak-before / model | vs N=1 |", "|---|---|---|---|---|---|---|"]
    for n, e in res["by_n"].items():
        if "error" in e:
            lines.append(f"| {n} | - | error: {' '.join(e['error'].split())[-200:]} |||||")
            continue
        for x in e["ranks"]:
            ratio = x.get("peak_ratio_to_n1")
            lines.append(f"| {n} | {x['rank']} | {x['before'] / mb:.0f} | "
                         f"{x['peak_minus_before'] / mb:.0f} | {x['rss_minus_before'] / mb:.0f} | "
                         f"{x['peak_over_model']:.2f} | "
                         f"{f'{ratio:.2f}' if ratio is not None else '-'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None,
                    help="checkpoint folder (default /tmp/wsd_1gb_bf16; --tp: /tmp/wsd_tp_fp32)")
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--tp", default=None,
                    help="comma list of rank counts: per-rank host memory of a split load")
    ap.add_argument("--json", default=None, help="--tp: also write the results here")
    args = ap.parse_args(argv)
    if args.tp:
        sizes = [int(x) for x in args.tp.split(",") if x.strip()]
        path = args.dir or "/tmp/wsd_tp_fp32"
        res = measure_tp(path, sizes, write_tp_checkpoint(path))
        res["shapes"] = TP_SHAPES
        print(tp_table(res))
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return res
    args.dir = args.dir or "/tmp/wsd_1gb_bf16"
    total = write_checkpoint(args.dir, args.size_gb)
    shard_sizes = [os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
                   if f.endswith(".safetensors")]
    out = subprocess.run([sys.executable, "-c", _CHILD, args.dir], capture_output=True,
                         text=True, check=True).stdout.split()
    base, peak = int(out[0]), int(out[1])
    res = {"model_bytes": total, "largest_shard_bytes": max(shard_sizes),
           "rss_after_import": base, "peak_rss": peak, "peak_minus_base": peak - base,
           "ratio_to_model": (peak - base) / total}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
