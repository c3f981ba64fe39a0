"""Host-side bookkeeping of the WSD loop: what a C++ driver (issue 5, `csrc/`) could save.

Between model calls the loop does host work: reading back a chunk, checking EOS, the
tokenizer handoff, the rule's state, detokenizing and stop strings. Where it sits decides
what it costs on a GPU:
  * drafting (pilot chunk -> read-back -> base scoring -> read-back of the rule): the GPU
    waits for this work, it is on the critical path;
  * the greedy continuation (`Model.stream_greedy`): the next decode step is already
    queued while the host books a token, so this work overlaps the GPU and costs nothing
    while it stays below one decode step.
A C++ driver could only shrink this part: graph replays and kernel launches are already C++
calls. This script measures it on the CPU: every model call (prefill, decode, chunk
scoring, log p) is wrapped and timed, and bookkeeping = phase time - model time, per phase
(the engine's own phase timings). On a CPU device everything is synchronous, so the split
is exact (kernel-launch calls such as the argmax between steps count as bookkeeping here;
on a GPU they are asynchronous launches).

    python -m benchmarks.host_overhead [--out results.json] [--reps 5]

It prints microseconds of bookkeeping per token of each phase, in text mode (tokenizers,
stop strings, incremental detokenization) and token-level mode (`generate_ids`), and the
fraction of a decode step at the floor of each preset on a card of the given bandwidth
(H100 HBM3 copy bandwidth ~3.0 TB/s by default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

PRESETS = ("llama3.2-1b", "llama3.1-8b")
# model calls by phase: drafting + scoring (pilot chunks, base chunk scoring, log p) and
# the continuation (base decode steps, the first token's logits)
DRAFT_CALLS = {("pilot", "decode_steps"), ("pilot", "decode_one_token"), ("pilot", "forward"),
               ("base", "score_chunk"), ("wsd", "_draft_logp")}
CONT_CALLS = {("base", "decode_one_token"), ("base", "logits"), ("base", "decode_steps")}


class _Clock:
    """Wall time spent inside wrapped callables, per label (outermost call only)."""

    def __init__(self):
        self.inside: dict = {}
        self.depth = 0

    def wrap(self, label, fn):
        def timed(*a, **k):
            if self.depth:                   # nested (forward inside prefill): count once
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.inside[label] = self.inside.get(label, 0.0) + time.perf_counter() - t0
                self.depth -= 1
        return timed


def instrument(wsd, clock: _Clock) -> None:
    """Wrap every call that does model work (on both models, and the rule's log p)."""
    for who, m in (("pilot", wsd.pilot), ("base", wsd.base)):
        for name in ("prefill", "forward", "decode_one_token", "decode_steps", "score_chunk",
                     "logits"):
            setattr(m, name, clock.wrap((who, name), getattr(m, name)))
    wsd._draft_logp = clock.wrap(("wsd", "_draft_logp"), wsd._draft_logp)


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
        clock.inside = {}
        r = run()
        t = r.timings
        draft_model = sum(v for k, v in clock.inside.items() if k in DRAFT_CALLS)
        cont_model = sum(v for k, v in clock.inside.items() if k in CONT_CALLS)
        draft_book = t["drafting"] + t["scoring"] - draft_model
        cont_book = t["continuation"] - cont_model
        rows.append({"draft_book_s": draft_book, "cont_book_s": cont_book,
                     "draft_tokens": r.draft_tokens, "base_tokens": r.base_tokens,
                     "chunks": math.ceil(r.draft_tokens / chunk), "total_s": t["total"],
                     "model_s": sum(clock.inside.values()), "switch_index": r.switch_index})
    med = sorted(rows, key=lambda x: x["draft_book_s"] + x["cont_book_s"])[len(rows) // 2]
    return {"draft_us_per_token": med["draft_book_s"] / med["draft_tokens"] * 1e6,
            "draft_us_per_chunk": med["draft_book_s"] / med["chunks"] * 1e6,
            "cont_us_per_token": med["cont_book_s"] / max(med["base_tokens"], 1) * 1e6, **med}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="draft cap and response length")
    ap.add_argument("--bw", type=float, default=3000.0,
                    help="copy GB/s of the card the fractions are for (H100 ~3000)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from wsd_engine.engine import WSD, WSDParams
    from wsd_engine.synthetic import make_wsd_pair, without_tokenizer

    res = {"device": "cpu", "chunk": a.chunk, "tokens": a.tokens, "bw_gbps": a.bw,
           "torch": torch.__version__, "modes": {}}
    with tempfile.TemporaryDirectory() as d:
        pair = make_wsd_pair(d, damp=0.02, perturb=0.05, sharpen=100.0)
        bare = [without_tokenizer(p, p + "_bare") for p in pair]   # token-level copies
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
    f1, f8 = floors["llama3.2-1b"], floors["llama3.1-8b"]
    chunk_ms = a.chunk * f1 + f8         # a drafted chunk at the floor: c 1B steps + one 8B
    res["chunk_floor_ms"] = chunk_ms
    print(f"host bookkeeping of the WSD loop (CPU, torch {torch.__version__}, chunk {a.chunk}, "
          f"{a.tokens} tokens, switch at {a.tokens // 2}); floors at {a.bw:.0f} GB/s: 1B step "
          f"{f1:.2f} ms, 8B step {f8:.2f} ms, drafted chunk (1B + 8B) {chunk_ms:.2f} ms")
    for name, r in res["modes"].items():
        r["draft_frac_of_chunk"] = r["draft_us_per_chunk"] / (chunk_ms * 1e3)
        r["cont_frac_of_8b_step"] = r["cont_us_per_token"] / (f8 * 1e3)
        print(f"  {name}:\n"
              f"    drafting (the GPU waits for it): {r['draft_us_per_chunk']:.0f} us per chunk "
              f"= {r['draft_frac_of_chunk'] * 100:.2f}% of the chunk at the floor\n"
              f"    continuation (overlaps the step in flight): {r['cont_us_per_token']:.1f} "
              f"us per token = {r['cont_frac_of_8b_step'] * 100:.2f}% of an 8B step")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
