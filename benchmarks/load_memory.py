"""Peak host memory of `load_model` on a ~1 GB bf16 checkpoint (random weights, 2 shards).

    python -m benchmarks.load_memory [--dir /tmp/wsd_1gb] [--size-gb 1.0]

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/wsd_1gb_bf16")
    ap.add_argument("--size-gb", type=float, default=1.0)
    args = ap.parse_args(argv)
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
