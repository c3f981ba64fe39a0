"""Host-side bookkeeping of the WSD loop: what a C++ driver (issue 5, `csrc/`) could save.

The loop's host work between model calls — reading back a chunk, checking EOS, the
tokenizer handoff, the rule's state, detokenizing and stop strings — runs while the GPU
waits (after a read-back) or overlaps it (otherwise). A C++ driver would only shrink this
part: graph replays and kernel launches are already C++ calls. This script measures it on
the CPU: every model call (prefill, decode, chunk scoring, log p) is wrapped and timed, and
bookkeeping = request wall time - time inside model calls. On a CPU device everything is
synchronous, so the split is exact; on CUDA the read-backs would block inside the
bookkeeping, so the script refuses to run there.

    python -m benchmarks.host_overhead [--out results.json] [--reps 5]

It prints microseconds of bookkeeping per token and per chunk, in text mode (tokenizers,
stop strings, incremental detokenization: the heavier path) and token-level mode
(`generate_ids`, what serving stacks and the benchmarks use), and the fraction of a decode
step at the floor of each preset on a card of the given bandwidth (H100 HBM3 copy
bandwidth ~3.0 TB/s by default; the floor is per token, so the fraction bounds what a C++
driver could save).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

PRESETS = ("llama3.2-1b", "llama3.1-8b")


class _Clock:
    """Accumulates the wall time spent inside wrapped callables."""

    def __init__(self):
        self.inside = 0.0
        self.depth = 0

    def wrap(self, fn):
        def timed(*a, **k):
            if self.depth:                   # nested (forward inside prefill): count once
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.inside += time.perf_counter() - t0
                self.depth -= 1
        return timed


def instrument(wsd, clock: _Clock) -> None:
    """Wrap every call that does model work (on both models, and the rule's log p)."""
    for m in (wsd.pilot, wsd.base):
        for name in ("prefill", "forward", "decode_one_token", "decode_steps", "score_chunk",
                     "logits"):
            setattr(m, name, clock.wrap(getattr(m, name)))
    wsd._draft_logp = clock.wrap(wsd._draft_logp)


def floor_ms(preset: str, bw_gbps: float) -> float:
    from wsd_engine.config import preset_config
    from wsd_engine.loader import expected_shapes
    cfg = preset_config(preset)
    n = sum(math.prod(s) * 2 for name, s in expected_shapes(cfg).items()   # bf16
            if not (name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings))
    return n / (bw_gbps * 1e9) * 1e3


def measure(wsd, run, reps: int, chunk: int) -> dict:
    clock = _Clock()
    instrument(wsd, clock)
    run()                                                   # warm-up
    rows = []
    for _ in range(reps):
        clock.inside = 0.0
        t0 = time.perf_counter()
        r = run()
        wall = time.perf_counter() - t0
        n_tok = r.draft_tokens + r.base_tokens
        n_chunks = math.ceil(r.draft_tokens / chunk) + math.ceil(r.base_tokens / chunk)
        rows.append({"wall_s": wall, "model_s": clock.inside, "book_s": wall - clock.inside,
                     "tokens": n_tok, "chunks": n_chunks, "switch_index": r.switch_index})
    med = sorted(rows, key=lambda x: x["book_s"])[len(rows) // 2]
    return {"book_us_per_token": med["book_s"] / med["tokens"] * 1e6,
            "book_us_per_chunk": med["book_s"] / med["chunks"] * 1e6,
            "book_frac_of_wall": med["book_s"] / med["wall_s"], **med,
            "all_book_s": [x["book_s"] for x in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="draft cap and response length")
    ap.add_argument("--bw", type=float, default=3000.0,
                    help="copy GB/s of the card the fractions are for (H100 ~3000)")
    a = ap.parse_args(argv)
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "":
        print("note: measuring on the CPU (model calls on CUDA return before the GPU is done, "
              "so the split would be wrong there)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from wsd_engine.engine import WSD, WSDParams
    from wsd_engine.synthetic import make_wsd_pair

    res = {"device": "cpu", "chunk": a.chunk, "tokens": a.tokens, "bw_gbps": a.bw,
           "torch": torch.__version__, "modes": {}}
    with tempfile.TemporaryDirectory() as d:
        pair = make_wsd_pair(d, damp=0.02, perturb=0.05, sharpen=100.0)
        bare = []                    # the same weights without tokenizer files: token level
        for src in pair:
            dst = src + "_bare"
            os.makedirs(dst)
            for f in ("config.json", "generation_config.json", "model.safetensors"):
                shutil.copy(os.path.join(src, f), dst)
            bare.append(dst)
        n = a.tokens
        kw = dict(max_seq_len=4 * n + 256)
        text, tokens = WSD.from_pretrained(*pair, **kw), WSD.from_pretrained(*bare, **kw)
        # a late forced switch (k = n/2) keeps both phases long; EOS ignored
        p = WSDParams(draft_max_tokens=n, max_new_tokens=n, chunk=a.chunk,
                      force_switch=n // 2, ignore_eos=True)
        prompt = "Tell me about the quick brown fox and the lazy dog."
        ids_p = text.pilot.tokenizer.encode("hello there, friend")
        ids_b = text.base.tokenizer.encode("[User] hello there, friend [Assistant]")
        modes = {"text (stop strings, detokenizer)": (text, lambda: text.generate(prompt, p)),
                 "token-level (generate_ids, no tokenizer)":
                     (tokens, lambda: tokens.generate_ids(ids_p, ids_b, p))}
        for name, (wsd, run) in modes.items():
            res["modes"][name] = measure(wsd, run, a.reps, a.chunk)
    floors = {pr: floor_ms(pr, a.bw) for pr in PRESETS}
    res["floor_ms"] = floors
    print(f"host bookkeeping of the WSD loop (CPU, torch {torch.__version__}, chunk {a.chunk}, "
          f"{a.tokens} tokens, switch at {a.tokens // 2}):")
    for name, r in res["modes"].items():
        fr = ", ".join(f"{r['book_us_per_token'] / (f * 1e3) * 100:.2f}% of a {pr} step "
                       f"({f:.2f} ms)" for pr, f in floors.items())
        print(f"  {name}: {r['book_us_per_token']:.1f} us/token, "
              f"{r['book_us_per_chunk']:.0f} us/chunk ({r['book_frac_of_wall'] * 100:.1f}% of "
              f"this CPU run) = {fr}")
        r["frac_of_floor_step"] = {pr: r["book_us_per_token"] / (f * 1e3)
                                   for pr, f in floors.items()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
