"""Compile every Triton kernel for a GPU target without a GPU (ahead of time, sm_90 default).

    python -m benchmarks.compile_check [--arch 90] [--json out.json]

The CPU interpreter runs the kernels' Python, not the compiler: a name defined in only one
branch, a type that differs between the arms of a runtime `if`, an op the GPU backend lacks,
or a config whose shared memory exceeds the card's only show up when the kernel is compiled
for a GPU. This compiles each kernel at the configs the launchers pick on a GPU (bf16 at
the shapes of the four benchmark presets, Llama-3.1-8B / 3.2-1B / 3.2-3B and Qwen2.5-7B:
the engine's decode / prefill / scoring paths, with and without PDL; fp32 and bf16 at the
shapes the GPU tests use; Gemma-2's soft-cap / sliding-window variants at head_dim 256 and
128) with the ptxas that ships with Triton's NVIDIA backend, and
prints shared memory, registers and spill stack per config, and for PDL kernels where
their loads sit against the wait. Exit status 1 if any
config fails to compile or needs more shared memory than an H100 block may use (227 KB).
Needs TRITON_INTERPRET unset; no GPU, no driver. `tests/test_gpu_compile.py` runs it in CI.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = 227 * 1024          # H100 / H200: max dynamic shared memory per block

# (n_q, n_kv, head_dim, d_model, intermediate, vocab): the benchmark presets (Llama-3.1-8B,
# Llama-3.2-1B, Llama-3.2-3B: GQA group 3; Qwen2.5-7B: group 7, q/k/v bias, vocab 152064),
# the tiny random model the GPU tests load (wsd_engine.synthetic.tiny_config) and a small
# head_dim-128 model (the GPU tests' fp32 attention cases)
SHAPES = {"8b": (32, 8, 128, 4096, 14336, 128256), "1b": (32, 8, 64, 2048, 8192, 128256),
          "3b": (24, 8, 128, 3072, 8192, 128256), "qwen7b": (28, 4, 128, 3584, 18944, 152064),
          "tiny": (4, 2, 16, 64, 128, 320), "h128": (8, 2, 128, 256, 512, 1000)}
QKV_BIAS = {"qwen7b"}
MODELS = (("8b", "bf16"), ("1b", "bf16"), ("3b", "bf16"), ("qwen7b", "bf16"),
          ("tiny", "fp32"), ("tiny", "bf16"), ("h128", "fp32"))


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _signature(fn, consts, ptr_types, float_args, dtype, ints):
    """Triton signature: constexprs; pointers (`dtype` unless named in ptr_types); scalars
    i32 unless in float_args. What the JIT specialises: pointers and strides of the engine's
    tensors are 16-byte / 16-element aligned, and an integer argument whose value (in
    `ints`) is a multiple of 16 gets that divisibility too (it is what lets a masked load
    along K become 16-byte vectors)."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        n = p.name
        if n in consts:
            sig[n] = "constexpr"
            continue
        if n.endswith("_ptr"):
            sig[n] = "*" + ptr_types.get(n, dtype)
        else:
            sig[n] = "fp32" if n in float_args else "i32"
        if (n.endswith("_ptr") or n.startswith("stride") or n.endswith("_stride")
                or (n in ints and ints[n] % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


@functools.cache
def configs():
    """One dict per kernel config: label, fn, consts, ptr_types, float_args, num_warps,
    num_stages, dtype (the model's) and ints (integer arguments' values at that shape)."""
    from wsd_engine.kernels import decode_attention as dec
    from wsd_engine.kernels import gemv as gemv_mod
    from wsd_engine.kernels import prefill_attention as pre
    from wsd_engine.kernels import rms_norm, swiglu
    from wsd_engine.kernels import switch_score as sw

    import torch
    cuda = torch.device("cuda")
    out = []

    def add(label, fn, consts, ptr_types, float_args, num_warps, num_stages, dtype="bf16",
            ints=None):
        out.append(dict(label=label, fn=fn, consts=consts, ptr_types=ptr_types,
                        float_args=float_args, num_warps=num_warps, num_stages=num_stages,
                        dtype=dtype, ints=ints or {}))

    # the real models in bf16; the GPU tests' tiny model (hd 16) in fp32 and bf16, and their
    # fp32 head_dim-128 attention cases
    for model, dt in MODELS:
        n_q, n_kv, hd, d, inter, vocab = SHAPES[model]
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        esize = 4 if dt == "fp32" else 2
        line_elems = 128 // esize
        fp32 = dt == "fp32"
        tag = model if dt == "bf16" else f"{model} {dt}"
        max_seq = 4096
        group, g_pad = n_q // n_kv, _next_pow2(n_q // n_kv)
        # decode attention: the engine's step (append + RoPE + fused merge, adaptive pieces,
        # 32 pieces as on a 132-SM card), the two-pass variant and its combine kernel
        dec_ptrs = {"o_part_ptr": "fp32", "lse_part_ptr": "fp32", "cos_ptr": "fp32",
                    "sin_ptr": "fp32", "len_ptr": "i64", "cnt_ptr": "i32"}
        dec_ints = {"max_seq": max_seq}
        dec_stages = 2 if fp32 else 3
        for append in (True, False):
            for fused in (True, False):
                splits = 32
                s_pad = _next_pow2(splits)
                consts = dict(GROUP=group, BLOCK_H=max(16, g_pad), HEAD_DIM=hd, BLOCK_N=64,
                              NUM_SPLITS=splits, LEN_FROM_PTR=True, FP32_DOT=fp32,
                              FUSED=fused, G_PAD=g_pad if fused else 1,
                              S_PAD=s_pad if fused else 1,
                              BLOCK_S=max(1, min(s_pad, 8192 // (g_pad * hd))) if fused else 1,
                              APPEND=append, ROPE=append, MIN_PIECE=dec.MIN_PIECE_DEFAULT,
                              LEN_OFFSET=1 if append else 0)   # the step passes its position
                label = (f"{tag} decode_attention {'append+rope ' if append else ''}"
                         f"{'fused' if fused else 'two-pass'} splits={splits}")
                add(label, dec._decode_attention_kernel, consts, dec_ptrs, {"qk_scale"}, 4,
                    dec_stages, dt, dec_ints)
                if append and fused:   # the engine's step with programmatic dependent launch
                    add(label + " pdl", dec._decode_attention_kernel,
                        dict(consts, PDL=True, PREFETCH_TILES=2,
                             LINES=-(-hd // line_elems), LINE_ELEMS=line_elems),
                        dec_ptrs, {"qk_scale"}, 4, dec_stages, dt, dec_ints)
        add(f"{tag} attention_combine splits=32", dec._attention_combine_kernel,
            dict(NUM_SPLITS=32, BLOCK_S=32, HEAD_DIM=hd, BLOCK_ROWS=max(1, 8192 // (32 * hd))),
            {"o_part_ptr": "fp32", "lse_part_ptr": "fp32"}, set(), 4, 1, dt,
            {"n_rows": n_q, "n_heads": n_q})
        # prefill attention: one decode-size token, a scored chunk of 8, the prefill buckets
        # (16 and 32: the 64- and 128-row tiles; 128, 512)
        for L, splits in ((1, 8), (8, 1), (8, 8), (16, 1), (16, 8), (32, 8), (128, 1),
                          (512, 1)):
            cfg = pre.prefill_config(L, group, hd, tdt, cuda)
            consts = dict(GROUP=group, G_PAD=g_pad, HEAD_DIM=hd, BLOCK_T=cfg["block_r"] // g_pad,
                          BLOCK_R=cfg["block_r"], BLOCK_N=cfg["block_n"], NUM_SPLITS=splits,
                          POS_FROM_PTR=True, FP32_DOT=fp32)
            add(f"{tag} prefill_attention L={L} splits={splits}", pre._prefill_attention_kernel,
                consts, {"cos_ptr": "fp32", "sin_ptr": "fp32", "o_part_ptr": "fp32",
                         "lse_part_ptr": "fp32", "pos_ptr": "i64"}, {"qk_scale"},
                cfg["num_warps"], cfg["num_stages"], dt,
                {"n_tokens": L, "pos_limit": max_seq, "n_q_heads": n_q})
        # gemv: every one-token matmul of a layer, and the lm_head with the final norm
        qkv_bias = model in QKV_BIAS
        for name, n, k, pre_mode, res, logits, bias in (
                ("qkv (norm+res" + (", bias)" if qkv_bias else ")"), (n_q + 2 * n_kv) * hd, d,
                 "rmsnorm", True, False, qkv_bias),
                ("o", d, n_q * hd, "none", False, False, False),
                ("gate_up (norm+res)", 2 * inter, d, "rmsnorm", True, False, False),
                ("down (swiglu)", d, inter, "swiglu", False, False, False),
                ("lm_head (norm, logits)", vocab, d, "rmsnorm", False, True, False)):
            cfg = gemv_mod.default_config(n, k)
            consts = dict(PRE=gemv_mod.PRE_MODES[pre_mode], HAS_RES=res, HAS_BIAS=bias,
                          LOGITS=logits, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                          STAGES=cfg["num_stages"], LINE_ELEMS=line_elems)
            l2_lines = cfg["l2_tiles"] * max(1, cfg["BLOCK_K"] // line_elems)
            for pdl in (False, True):   # pdl: first weight tile before the PDL wait
                add(f"{tag} gemv {name} N={n} K={k}{' pdl' if pdl else ''}",
                    gemv_mod._gemv_kernel,
                    dict(consts, PREFETCH=pdl, PDL=pdl, L2_LINES=l2_lines if pdl else 0),
                    {"y_ptr": "fp32"} if logits else {}, {"K_f", "eps"},
                    cfg["num_warps"], cfg["num_stages"], dt, {"N": n, "K": k})
        # layer kernels at their GPU launch shapes
        block_d = _next_pow2(d)
        for res in (True, False):
            add(f"{tag} rms_norm residual={res}", rms_norm._rms_norm_kernel,
                dict(HAS_RESIDUAL=res, BLOCK_D=block_d), {}, {"D_f", "eps"},
                min(16, max(1, block_d // 512)), 3, dt, {"D": d})
        for block in (256, 1024):
            add(f"{tag} swiglu block={block}", swiglu._swiglu_kernel, dict(BLOCK=block), {},
                set(), 4, 3, dt, {"I": inter})
        add(f"{tag} geglu block=1024", swiglu._swiglu_kernel, dict(BLOCK=1024, ACT=1), {},
            set(), 4, 3, dt, {"I": inter})
        # switch_score: the GPU launch (bf16: 64 x 128 tiles, 4 stages; fp32: 64 x 64, 2)
        for c in (8, 64):
            block_c = max(16, _next_pow2(c))
            add(f"{tag} switch_score c={c} V={vocab} d={d}", sw._switch_score_kernel,
                dict(TILES_PER_PROG=4, BLOCK_C=block_c, BLOCK_V=64,
                     BLOCK_D=64 if fp32 else 128, UPCAST=fp32),
                {"ids_ptr": "i64", "wsf_ptr": "fp32", "wsi_ptr": "i32"}, set(), 4,
                2 if fp32 else 4, dt, {"C": c, "D": d, "V": vocab})
    # Gemma-2's variants (bf16; scale / soft-caps / sliding window are constexprs, so each
    # is its own kernel): 9B-like (hd 256, group 2) and 27B-like (hd 128, group 2) heads.
    # Sliding layers: SOFTCAP=50 + WINDOW=4096; global layers: SOFTCAP=50 alone.
    for tag, n_q, n_kv, hd, d, vocab in (("gemma2-9b", 16, 8, 256, 3584, 256000),
                                         ("gemma2-27b", 32, 16, 128, 4608, 256000)):
        group, g_pad = n_q // n_kv, _next_pow2(n_q // n_kv)
        line_elems = 64
        for variant, extra in (("softcap+window", dict(SOFTCAP=50.0, WINDOW=4096)),
                               ("softcap", dict(SOFTCAP=50.0))):
            splits = 32
            add(f"{tag} decode_attention append+rope fused splits={splits} {variant}",
                dec._decode_attention_kernel,
                dict(GROUP=group, BLOCK_H=max(16, g_pad), HEAD_DIM=hd, BLOCK_N=64,
                     NUM_SPLITS=splits, LEN_FROM_PTR=True, FP32_DOT=False, FUSED=True,
                     G_PAD=g_pad, S_PAD=splits,
                     BLOCK_S=max(1, min(splits, 8192 // (g_pad * hd))), APPEND=True,
                     ROPE=True, MIN_PIECE=dec.MIN_PIECE_DEFAULT, LEN_OFFSET=1, ROWS=True,
                     LINES=-(-hd // line_elems), LINE_ELEMS=line_elems, **extra),
                {"o_part_ptr": "fp32", "lse_part_ptr": "fp32", "cos_ptr": "fp32",
                 "sin_ptr": "fp32", "len_ptr": "i64", "cnt_ptr": "i32", "slot_ptr": "i64"},
                {"qk_scale"}, 4, 3, "bf16", {"max_seq": 8192})
            for L, splits in ((8, 8), (128, 1)):
                cfg = pre.prefill_config(L, group, hd, torch.bfloat16, cuda)
                add(f"{tag} prefill_attention L={L} splits={splits} {variant}",
                    pre._prefill_attention_kernel,
                    dict(GROUP=group, G_PAD=g_pad, HEAD_DIM=hd,
                         BLOCK_T=cfg["block_r"] // g_pad, BLOCK_R=cfg["block_r"],
                         BLOCK_N=cfg["block_n"], NUM_SPLITS=splits, POS_FROM_PTR=True,
                         FP32_DOT=False, ROWS=True, **extra),
                    {"cos_ptr": "fp32", "sin_ptr": "fp32", "o_part_ptr": "fp32",
                     "lse_part_ptr": "fp32", "pos_ptr": "i64", "cu_ptr": "i64",
                     "slot_ptr": "i64"}, {"qk_scale"}, cfg["num_warps"], cfg["num_stages"],
                    "bf16", {"n_tokens": L, "pos_limit": 8192, "n_q_heads": n_q})
        add(f"{tag} switch_score c=8 V={vocab} d={d} softcap", sw._switch_score_kernel,
            dict(TILES_PER_PROG=4, BLOCK_C=16, BLOCK_V=64, BLOCK_D=128, UPCAST=False,
                 SOFTCAP=30.0),
            {"ids_ptr": "i64", "wsf_ptr": "fp32", "wsi_ptr": "i32"}, set(), 4, 4, "bf16",
            {"C": 8, "D": d, "V": vocab})
    # merge of switch_score's partials (fp32 workspaces, any model)
    for c in (8, 64):
        block_c = max(16, _next_pow2(c))
        for n_prev_ptr, from_logp in ((True, False), (False, True)):
            add(f"switch_score_combine c={c} n_prev_ptr={n_prev_ptr} from_logp={from_logp}",
                sw._switch_score_combine_kernel,
                dict(BLOCK_C=block_c, BLOCK_P=min(256, max(16, 4096 // block_c)),
                     N_PREV_IS_PTR=n_prev_ptr, FROM_LOGP=from_logp),
                {"wsf_ptr": "fp32", "wsi_ptr": "i32", "logp_in_ptr": "fp32",
                 "carry_ptr": "fp32", "n_prev_ptr": "i64", "logp_ptr": "fp32",
                 "lse_ptr": "fp32", "argmax_ptr": "i64", "mean_ptr": "fp32",
                 "first_ptr": "i32"},
                {"window_f", "log_gamma"}, 4, 3, "fp32", {"C": c})
    # tensor parallelism (vocab-sharded lm_head): one shard's P partials merged per token
    # (its score pass is the switch_score kernel above on Vr rows), then the rows combine
    # over the N ranks' gathered partials (BLOCK_P = N), fp32 and float64 rule
    for c in (8, 64):
        block_c = max(16, _next_pow2(c))
        add(f"switch_score_partials_merge c={c}", sw._switch_score_partials_merge_kernel,
            dict(BLOCK_C=block_c, BLOCK_P=min(256, max(16, 4096 // block_c))),
            {"wsf_ptr": "fp32", "wsi_ptr": "i32", "part_ptr": "fp32", "idx_ptr": "i32"},
            set(), 4, 3, "fp32", {"T": c})
        for n_ranks, fp64 in ((2, False), (8, False), (8, True)):
            fdt = "fp64" if fp64 else "fp32"
            add(f"switch_score_rows_combine from_partials tp={n_ranks} c={c} {fdt}",
                sw._switch_score_rows_combine_kernel,
                dict(BLOCK_C=block_c, BLOCK_P=n_ranks, FROM_LOGP=False, FP64=fp64),
                {"wsf_ptr": "fp32", "wsi_ptr": "i32", "logp_in_ptr": "fp32", "cu_ptr": "i64",
                 "carry_ptr": fdt, "n_prev_ptr": "i64", "window_ptr": "i64",
                 "log_gamma_ptr": fdt, "logp_ptr": "fp32", "lse_ptr": "fp32",
                 "argmax_ptr": "i64", "mean_ptr": "fp32", "first_ptr": "i64"},
                set(), 4, 3, "fp32", {"CT": c})
    return out


def _usage(cubin: bytes):
    """(registers, spill stack bytes) per thread from cuobjdump, or ('?', '?')."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", txt)
    return (int(m.group(1)), int(m.group(2))) if m else ("?", "?")


def _pdl_order(ptx: str) -> dict:
    """Where a PDL kernel's global loads and L2 prefetches sit relative to its
    griddepcontrol.wait / launch_dependents (kernels/pdl.py's rules, read off the PTX)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    waits = [i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln]
    releases = [i for i, ln in enumerate(lines) if "griddepcontrol.launch_dependents" in ln]
    first_wait = waits[0] if waits else len(lines)
    return {"waits": len(waits), "releases": len(releases),
            "release_after_wait": bool(waits and releases and releases[0] > first_wait),
            "loads_before_wait": sum(1 for ln in lines[:first_wait]
                                     if "ld.global" in ln or "cp.async" in ln),
            "prefetches_before_wait": sum(1 for ln in lines[:first_wait]
                                          if ln.startswith("prefetch") or " prefetch." in ln)}


def compile_one(label, fn, consts, ptr_types, float_args, num_warps, num_stages,
                dtype="bf16", ints=None, arch=90):
    """Compile one kernel config for sm_<arch>; a row with ok, smem, regs, stack or error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    # constexpr parameters not named take their defaults (never a runtime i32)
    consts = {**{p.name: p.default for p in fn.params
                 if p.is_constexpr and p.name not in consts}, **consts}
    sig, attrs = _signature(fn, consts, ptr_types, float_args, dtype, ints or {})
    # a scalar like n_prev is a pointer only when its *_IS_PTR flag says so
    for flag, arg in (("N_PREV_IS_PTR", "n_prev"),):
        if arg in sig and consts.get(flag):
            sig[arg] = "*i64"
    t0 = time.perf_counter()
    row = dict(kernel=label, num_warps=num_warps, num_stages=num_stages)
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        regs, stack = _usage(k.asm["cubin"])
        row.update(ok=k.metadata.shared <= SMEM_LIMIT, smem=k.metadata.shared, regs=regs,
                   stack=stack)
        if consts.get("PDL"):
            row["pdl"] = _pdl_order(k.asm["ptx"])
        if not row["ok"]:
            row["error"] = f"shared memory {k.metadata.shared} B > {SMEM_LIMIT} B"
    except Exception as e:  # noqa: BLE001 - every failure is reported, then exit 1
        msg = str(e).strip().splitlines()
        row.update(ok=False, error=f"{type(e).__name__}: {' | '.join(msg[-3:])[:400]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_index(i: int, arch: int) -> dict:
    return compile_one(**configs()[i], arch=arch)


def compile_all(arch: int = 90, only: str | None = None, jobs: int = 1):
    """Compile every config (whose label contains `only`), `jobs` processes at a time
    (ptxas and the Triton passes are single-threaded); rows in config order."""
    idx = [i for i, cfg in enumerate(configs()) if not only or only in cfg["label"]]
    if jobs <= 1 or len(idx) < 2:
        return [_compile_index(i, arch) for i in idx]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(_compile_index, idx, [arch] * len(idx)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    ap.add_argument("--only", help="compile only the configs whose label contains this")
    ap.add_argument("--json", help="write the rows as JSON to this path")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="compile in this many processes (default: up to 4, one per CPU)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)",
              file=sys.stderr)
        return 2
    import triton
    rows = compile_all(args.arch, args.only, args.jobs)
    print(f"| kernel config (sm_{args.arch}, triton {triton.__version__}) | warps | stages | "
          f"smem KB | regs | spill B | ok |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "smem" in r:
            print(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | "
                  f"{r['smem'] / 1024:.0f} | {r['regs']} | {r['stack']} | "
                  f"{'yes' if r['ok'] else 'NO: ' + r['error']} |")
        else:
            print(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | | | | "
                  f"NO: {r['error']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, triton=triton.__version__, rows=rows), f, indent=1)
    bad = [r["kernel"] for r in rows if not r["ok"]]
    if bad:
        print(f"compile_check: {len(bad)} of {len(rows)} configs failed: {', '.join(bad)}",
              file=sys.stderr)
        return 1
    print(f"compile_check: all {len(rows)} configs compile for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
