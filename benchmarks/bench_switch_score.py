"""Benchmark: fused switch_score vs its torch reference vs torch.compile(reference).

    python benchmarks/bench_switch_score.py --out switch_score.json        # CUDA, Llama-3.1-8B
    python benchmarks/bench_switch_score.py --cpu-smoke                    # interpreter, tiny

The kernel must read the bf16 lm_head once (V*d*2 bytes, 1.05 GB at V=128256, d=4096), so
its floor is that many bytes at the device's copy bandwidth, measured here in the same run
(a 1 GiB device-to-device copy, bytes read + written / time). Also timed: a plain torch
implementation an engine would write without the kernel (bf16 F.linear, then log_softmax).
The small helpers at the top are shared with bench_layers.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


# ------------------------------------------------------------------ shared helpers

def setup_backend(cpu_smoke: bool) -> torch.device:
    """Pick the device; on CPU switch Triton to its interpreter before kernels are imported."""
    if cpu_smoke or not torch.cuda.is_available():
        if not cpu_smoke:
            sys.exit("no CUDA device: run with --cpu-smoke to exercise the benchmark on CPU")
        if "wsd_engine.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("kernels were imported before TRITON_INTERPRET=1 was set")
        os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    return torch.device("cuda")


def time_ms(fn, device: torch.device, reps: int = 100) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, (bytes read + written) / time, in GB/s."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)         # 1 GiB on GPU
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    src = dst = None
    return 2 * n / (ms * 1e-3) / 1e9


def maybe_compile(fn, enabled: bool):
    """torch.compile(fn) or None when disabled or unavailable."""
    if not enabled:
        return None
    try:
        return torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - report, don't fail the benchmark
        print(f"torch.compile unavailable: {e}", file=sys.stderr)
        return None


def run_case(rows, case: str, impls: dict, nbytes: int, copy_gbps: float, device, ref_name="torch_ref"):
    """Time each impl (None = skipped), append result dicts to rows. A row without a time
    says why: `skipped` (not asked for here) or `error` (it raised; the text is kept)."""
    base = None
    for name, fn in impls.items():
        empty = dict(case=case, impl=name, ms=None, gbps=None, frac_copy=None, speedup=None)
        if fn is None:
            rows.append(dict(empty, skipped=True))
            continue
        try:
            ms = time_ms(fn, device)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing at first call
            err = f"{type(e).__name__}: {str(e).strip()[:500]}"
            print(f"{case} {name} failed: {err}", file=sys.stderr)
            rows.append(dict(empty, error=err))
            continue
        gbps = nbytes / (ms * 1e-3) / 1e9
        if name == ref_name:
            base = ms
        rows.append(dict(case=case, impl=name, ms=ms, gbps=gbps, frac_copy=gbps / copy_gbps,
                         speedup=None))
    for r in rows:
        if r["case"] == case and r["ms"] and base:
            r["speedup"] = base / r["ms"]


def _speed(ratio: float) -> str:
    """A speed ratio in words: "2.00x faster" / "1.25x slower" (never "0.80x faster")."""
    if abs(ratio - 1.0) < 0.005:
        return "1.00x (same)"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def print_table(rows, title: str, copy_gbps: float, device_name: str):
    print(f"\n### {title} on {device_name} (copy bandwidth {copy_gbps:.0f} GB/s)\n")
    print("| case | impl | time (us) | GB/s | of copy BW | vs torch ref |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r["ms"] is None:
            what = f"failed: {r['error'].splitlines()[0][:80]}" if "error" in r else "skipped"
            print(f"| {r['case']} | {r['impl']} | {what} | | | |")
            continue
        sp = _speed(r["speedup"]) if r["speedup"] else ""
        print(f"| {r['case']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.3g} | "
              f"{100 * r['frac_copy']:.1f}% | {sp} |")


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {path}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"


# ------------------------------------------------------------------ switch_score

def _torch_linear_impl(hidden, weight, ids):
    """What an engine without the kernel would do: bf16 logits, fp32 log_softmax (no window)."""
    logits = torch.nn.functional.linear(hidden, weight).float()       # [c, V]
    logp = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
    return logp, logits.argmax(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the Triton interpreter")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--c", type=int, default=None, help="chunk size (default 8)")
    ap.add_argument("--vocab", type=int, default=None, help="default 128256")
    ap.add_argument("--dim", type=int, default=None, help="default 4096")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(ref)")
    ap.add_argument("--sweep", action="store_true", help="also time a few block configurations")
    args = ap.parse_args(argv)

    device = setup_backend(args.cpu_smoke)
    from wsd_engine.kernels.switch_score import switch_score, switch_score_ref

    smoke = device.type == "cpu"
    c = args.c or 8
    V = args.vocab or (1000 if smoke else 128256)
    d = args.dim or (64 if smoke else 4096)
    dtype = torch.bfloat16
    window, n_prev, log_gamma = 6, 3, -0.22314355                     # gamma = 0.8

    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(c, d, device=device, generator=g).to(dtype)                   # [c, d]
    weight = (torch.randn(V, d, device=device, generator=g) * d ** -0.5).to(dtype)     # [V, d]
    ids = torch.randint(0, V, (c,), device=device, generator=g)                        # [c]
    carry = -torch.rand(window - 1, device=device, generator=g)                        # [w-1]
    n_prev_t = torch.tensor([n_prev], device=device)

    # validate before timing
    out = switch_score(hidden, weight, ids, carry, n_prev_t, window, log_gamma)
    ref = switch_score_ref(hidden, weight, ids, carry, n_prev, window, log_gamma)
    err = (out.logp - ref.logp).abs().max().item()
    print(f"max |logp - ref| = {err:.2e}; first = {out.first.item()} (ref {ref.first.item()})")
    if err > 1e-3:
        sys.exit("kernel disagrees with the reference; not timing it")

    copy_gbps = copy_bandwidth_gbps(device)
    elem = weight.element_size()
    nbytes = V * d * elem + c * d * elem + c * 8 + carry.numel() * 4 + c * (4 + 4 + 8 + 4) + 4
    compiled = maybe_compile(switch_score_ref, enabled=not (args.no_compile or smoke))
    case = f"c={c} V={V} d={d} {str(dtype).split('.')[-1]}"
    impls = {
        "triton switch_score": lambda: switch_score(hidden, weight, ids, carry, n_prev_t, window,
                                                    log_gamma, out=out),
        "torch_ref": lambda: switch_score_ref(hidden, weight, ids, carry, n_prev, window, log_gamma),
        "torch.compile(ref)": (lambda: compiled(hidden, weight, ids, carry, n_prev, window,
                                                log_gamma)) if compiled else None,
        "torch bf16 linear+log_softmax": lambda: _torch_linear_impl(hidden, weight, ids),
    }
    if args.sweep:
        for bv, bd, nw, ns in ((64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3), (32, 256, 4, 4),
                               (128, 64, 4, 4)):
            impls[f"triton bv={bv} bd={bd} w={nw} s={ns}"] = (
                lambda bv=bv, bd=bd, nw=nw, ns=ns: switch_score(
                    hidden, weight, ids, carry, n_prev_t, window, log_gamma, out=out,
                    block_v=bv, block_d=bd, num_warps=nw, num_stages=ns))
    rows = []
    run_case(rows, case, impls, nbytes, copy_gbps, device)
    name = device_name(device)
    print_table(rows, "switch_score", copy_gbps, name)
    write_json(args.out, dict(benchmark="switch_score", device=name, copy_gbps=copy_gbps,
                              bytes=nbytes, c=c, vocab=V, dim=d, dtype=str(dtype),
                              max_abs_logp_err=err, results=rows,
                              date=time.strftime("%Y-%m-%d")))
    return rows


if __name__ == "__main__":
    main()
