"""Host-side bookkeeping of the WSD loop: what the host does between the model forwards.

Between model calls the loop does host work: building each forward's row description,
reading back the tokens, checking EOS, the tokenizer handoff, the rule's state,
detokenizing and stop strings, the scheduler. In the batched engine (`WSD._step`) one step
launches the pilot's chunks / the base's blocks for every running row and one scoring
forward with no host sync in between, then reads back once and runs the host bookkeeping
of every row: on a GPU the device waits for that part, so it is on the critical path.

This script measures it on the CPU: every engine step (`WSD._step`) is timed, and inside it
every model call — `Model.run_rows` (prefill, decode and scoring forwards),
`Model.decode_rows` (a graph replay when captured), `Model.score_switch` (log p + the rule),
`Model.logits`
and the token choice (`BatchRunner._choose`: argmax / sampling) — is timed and subtracted:
host time = step wall time - model time. On a CPU device everything is synchronous, so
the split is exact. Small tensor ops that are not a model call (index tensors, buffer
updates, the rule's ops in `first_pass_rows` when the engine runs them outside a model
call) stay in host time: on a GPU they are kernel launches, i.e. host time too.

Two measurements:
  * one request (`--tokens` draft cap and response, forced switch at half): host time per
    drafting step (a chunk) and per continuation token, text mode (tokenizers, stop
    strings, incremental detokenizer) and token level (`generate_ids`);
  * batched (`--batch-sizes`, default 1..32): B requests started together, all with the
    switch forced at half, so every step is a pure drafting or a pure continuation step:
    host microseconds per step and per row per token, for drafting and continuation steps,
    split into the runner's host part (row descriptions, index tensors, read-back) and the
    engine's / requests' bookkeeping, both modes; then against an 8B decode step at its
    floor on a card of `--bw` GB/s (H100 ~3.0 TB/s: 5.0 ms).
  * `--profile-batch B`: cProfile of the batched run at batch B with a clock that stops
    while a model call runs, so cumulative times are host time only.

    python -m benchmarks.host_overhead [--out results.json] [--reps 5]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

PRESETS = ("llama3.2-1b", "llama3.1-8b")
# per model, outermost only; whichever of them the engine has (`score_switch`: log p and
# the rule in one device call)
MODEL_CALLS = ("run_rows", "decode_rows", "score_switch", "logits")
SECTIONS = ("prefill", "decode_blocks", "score_and_feed", "switch")   # BatchRunner calls of a step
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


class Probe:
    """Times each engine step, the runner sections inside it and every model call
    (outermost only: a `run_rows` inside `decode_rows` counts once)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.cur: dict | None = None
        self.depth = 0
        self.model_acc = 0.0         # all model seconds so far (the profiler clock)
        self.model_t0 = None         # start of the model call running now
        self.section = None

    def reset(self) -> None:
        self.steps = []

    # the profiler's clock: wall time with every model call cut out
    def clock(self) -> float:
        if self.model_t0 is not None:
            return self.model_t0 - self.model_acc
        return time.perf_counter() - self.model_acc

    def _model(self, label, fn):
        def timed(*a, **k):
            if self.depth:
                return fn(*a, **k)
            self.depth = 1
            self.model_t0 = t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.model_acc += dt
                self.model_t0 = None
                self.depth = 0
                c = self.cur
                if c is not None:
                    c["model"] += dt
                    c["model_by"][label] = c["model_by"].get(label, 0.0) + dt
                    if self.section:
                        c["sec_model"][self.section] += dt
        return timed

    def _section(self, name, fn):
        def timed(*a, **k):
            prev, self.section = self.section, name
            t0 = time.perf_counter()
            try:
                out = fn(*a, **k)
            finally:
                if self.cur is not None:
                    self.cur["sec_wall"][name] += time.perf_counter() - t0
                self.section = prev
            c = self.cur
            if c is not None and name == "decode_blocks":
                drafting, continuing = a[0], a[1]
                chunks, blocks = out
                c["n_draft"] += len(drafting)
                c["n_cont"] += len(continuing)
                c["draft_tokens"] += sum(len(x) for x in chunks)
                c["cont_tokens"] += sum(len(x) for x in blocks)
            if c is not None and name == "prefill":
                c["admitted"] += len(a[0])
            return out
        return timed

    def _rule(self, fn):
        """The rule's tensor ops: inside a model call (`score_switch`) they are model
        time, else host time; either way their time is recorded apart."""
        def timed(*a, **k):
            inside = self.depth > 0
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.cur is not None:
                    self.cur["rule_model" if inside else "rule"] += time.perf_counter() - t0
        return timed

    def _step(self, fn):
        def timed(*a, **k):
            self.cur = c = {"wall": 0.0, "model": 0.0, "model_by": {}, "rule": 0.0,
                            "rule_model": 0.0,
                            "sec_wall": dict.fromkeys(SECTIONS, 0.0),
                            "sec_model": dict.fromkeys(SECTIONS, 0.0),
                            "n_draft": 0, "n_cont": 0, "draft_tokens": 0, "cont_tokens": 0,
                            "admitted": 0}
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                c["wall"] = time.perf_counter() - t0
                self.steps.append(c)
                self.cur = None
        return timed

    def install(self, wsd):
        """Wrap the engine's step, its runner's sections and both models' calls (instance
        attributes); returns a function that takes them off again."""
        import wsd_engine.batch as wb
        import wsd_engine.runner as wr
        runner = wsd._runner
        for who, m in (("pilot", wsd.pilot), ("base", wsd.base)):
            for name in MODEL_CALLS:
                if hasattr(m, name):
                    setattr(m, name, self._model(f"{who}.{name}", getattr(m, name)))
        runner._choose = self._model("choose", runner._choose)
        for name in SECTIONS:
            setattr(runner, name, self._section(name, getattr(runner, name)))
        wsd._step = self._step(wsd._step)
        # the rule (`first_pass_rows`) where the engine calls it from
        rules = [(mod, mod.first_pass_rows) for mod in (wb, wr)
                 if hasattr(mod, "first_pass_rows")]
        for mod, fn in rules:
            mod.first_pass_rows = self._rule(fn)

        def undo():
            for m in (wsd.pilot, wsd.base):
                for name in MODEL_CALLS:
                    m.__dict__.pop(name, None)
            for name in ("_choose",) + SECTIONS:
                runner.__dict__.pop(name, None)
            wsd.__dict__.pop("_step", None)
            for mod, fn in rules:
                mod.first_pass_rows = fn
        return undo


def step_kind(s: dict) -> str:
    """admit (new rows prefilled this step), draft (every row drafting), cont (every row
    continuing), mixed, or idle."""
    if s["admitted"]:
        return "admit"
    if s["n_draft"] and not s["n_cont"]:
        return "draft"
    if s["n_cont"] and not s["n_draft"]:
        return "cont"
    return "mixed" if s["n_draft"] else "idle"


def host_s(s: dict) -> float:
    return s["wall"] - s["model"]


def runner_host_s(s: dict) -> float:
    """The runner's own host work: the sections' wall time less the model calls in them."""
    return sum(s["sec_wall"][n] - s["sec_model"][n] for n in SECTIONS)


def summarize(steps: list[dict]) -> dict:
    """Per step kind: steps, rows, host µs per step (median and mean), per row per token,
    split runner / engine (+ the rule's tensor ops), model µs per step."""
    out = {}
    for kind in ("admit", "draft", "cont", "mixed"):
        ss = [s for s in steps if step_kind(s) == kind]
        if not ss:
            continue
        tokens = sum(s["draft_tokens"] + s["cont_tokens"] for s in ss)
        rows = sum(s["n_draft"] + s["n_cont"] for s in ss)
        host = [host_s(s) for s in ss]
        runner = sum(runner_host_s(s) for s in ss)
        rule = sum(s["rule"] for s in ss)                 # the rule's ops in host time
        rule_all = rule + sum(s["rule_model"] for s in ss)
        n = len(ss)
        out[kind] = {
            "steps": n, "rows_per_step": rows / n, "tokens_per_row": tokens / max(rows, 1),
            "host_us_per_step": statistics.median(host) * 1e6,
            "host_us_per_step_mean": sum(host) / n * 1e6,
            "host_us_per_row_token": sum(host) / max(tokens, 1) * 1e6,
            "runner_us_per_step": (runner - rule) / n * 1e6,
            "rule_us_per_step": rule_all / n * 1e6,
            "rule_in_host_us_per_step": rule / n * 1e6,
            "engine_us_per_step": (sum(host) - runner) / n * 1e6,
            "model_us_per_step": sum(s["model"] for s in ss) / n * 1e6,
            "wall_us_per_step": sum(s["wall"] for s in ss) / n * 1e6,
        }
    return out


def floor_ms(preset: str, bw_gbps: float) -> float:
    from wsd_engine.config import preset_config
    from wsd_engine.loader import expected_shapes
    cfg = preset_config(preset)
    n = sum(math.prod(s) * 2 for name, s in expected_shapes(cfg).items()   # bf16
            if not (name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings))
    return n / (bw_gbps * 1e9) * 1e3


# ------------------------------------------------------------------------- one request

def measure(wsd, run, reps: int, chunk: int) -> dict:
    """One request at a time: host seconds of its drafting steps (the admission step, which
    also prefills, included) and of its continuation steps, median of `reps` runs."""
    probe = Probe()
    undo = probe.install(wsd)
    try:
        run()                                                   # warm-up
        rows = []
        for _ in range(reps):
            probe.reset()
            r = run()
            draft = [s for s in probe.steps if step_kind(s) in ("admit", "draft", "mixed")]
            cont = [s for s in probe.steps if step_kind(s) == "cont"]
            rows.append({"draft_book_s": sum(map(host_s, draft)),
                         "cont_book_s": sum(map(host_s, cont)),
                         "draft_tokens": r.draft_tokens, "base_tokens": r.base_tokens,
                         "chunks": len(draft), "steps": len(probe.steps),
                         "cont_step_tokens": sum(s["cont_tokens"] for s in cont),
                         "total_s": r.timings["total"],
                         "model_s": sum(s["model"] for s in probe.steps),
                         "switch_index": r.switch_index})
    finally:
        undo()
    med = sorted(rows, key=lambda x: x["draft_book_s"] + x["cont_book_s"])[len(rows) // 2]
    return {"draft_us_per_token": med["draft_book_s"] / max(med["draft_tokens"], 1) * 1e6,
            "draft_us_per_chunk": med["draft_book_s"] / max(med["chunks"], 1) * 1e6,
            "cont_us_per_token": med["cont_book_s"] / max(med["cont_step_tokens"], 1) * 1e6,
            **med}


# ------------------------------------------------------------------------- batched

def measure_batched(wsd, run_b, sizes, reps: int) -> dict:
    """run_b(B) starts B requests together (all switching at the same forced k). Per B:
    the steps of `reps` runs after one warm-up, summarized per step kind."""
    probe = Probe()
    undo = probe.install(wsd)
    out = {}
    try:
        for B in sizes:
            run_b(B)                                            # warm-up at this size
            steps, walls, n_tok = [], [], 0
            for _ in range(reps):
                probe.reset()
                t0 = time.perf_counter()
                res = run_b(B)
                walls.append(time.perf_counter() - t0)
                steps += probe.steps
                n_tok = sum(len(r.token_ids) for r in res)
            rec = {"batch": B, "runs": reps, "tokens_per_run": n_tok,
                   "wall_s": statistics.median(walls),
                   "steps_per_run": len(steps) / reps,
                   "host_s_per_run": sum(map(host_s, steps)) / reps,
                   "model_s_per_run": sum(s["model"] for s in steps) / reps,
                   "kinds": summarize(steps)}
            rec["outside_steps_s_per_run"] = rec["wall_s"] - sum(s["wall"] for s in steps) / reps
            out[str(B)] = rec
    finally:
        undo()
    return out


def profile_batched(wsd, run_b, B: int, top: int = 25) -> dict:
    """cProfile of one batched run at batch B (after a warm-up) with a clock that stops
    inside model calls: each function's cumulative time is host time only. Returns the
    top functions by cumulative time, per engine step."""
    probe = Probe()
    undo = probe.install(wsd)
    try:
        run_b(B)
        probe.reset()
        prof = cProfile.Profile(timer=probe.clock)
        prof.enable()
        run_b(B)
        prof.disable()
    finally:
        undo()
    n_steps = max(len(probe.steps), 1)
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        where = os.path.relpath(file, REPO) if file.startswith(REPO) else os.path.basename(file)
        rows.append({"function": f"{where}:{line}({fn})", "calls_per_step": nc / n_steps,
                     "tottime_us_per_step": tt / n_steps * 1e6,
                     "cumtime_us_per_step": ct / n_steps * 1e6})
    rows.sort(key=lambda r: -r["cumtime_us_per_step"])
    # the probe's own wrappers (their time is the wrapped call's) are left out
    rows = [r for r in rows if "host_overhead.py" not in r["function"]]
    return {"batch": B, "steps": n_steps,
            "note": "cProfile with a clock that stops inside model calls (run_rows, "
                    "decode_rows, score_switch, logits, the token choice): host time only; the "
                    "profiler itself inflates small Python calls",
            "top": rows[:top]}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of batch sizes, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="draft cap and response length")
    ap.add_argument("--bw", type=float, default=3000.0,
                    help="copy GB/s of the card the fractions are for (H100 ~3000)")
    ap.add_argument("--batch-sizes", type=_sizes, default=list(BATCH_SIZES),
                    help="batched measurement sizes (default 1,2,4,8,16,32)")
    ap.add_argument("--no-batched", action="store_true", help="only the one-request numbers")
    ap.add_argument("--profile-batch", type=int, default=32,
                    help="cProfile the batched run at this size (0: no profile)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: host time is single-threaded "
                         "Python; the models here are tiny)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from wsd_engine.engine import WSD, WSDParams
    from wsd_engine.synthetic import make_wsd_pair, without_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    sizes = [] if a.no_batched else a.batch_sizes
    nb = max(sizes + [a.profile_batch if not a.no_batched else 0, 1])
    res = {"device": "cpu", "chunk": a.chunk, "tokens": a.tokens, "bw_gbps": a.bw,
           "torch": torch.__version__, "threads": a.threads, "modes": {}, "batched": {},
           "profile": {}}
    try:
        with tempfile.TemporaryDirectory() as d:
            pair = make_wsd_pair(d, damp=0.02, perturb=0.05, sharpen=100.0)
            bare = [without_tokenizer(p, p + "_bare") for p in pair]   # token-level copies
            n = a.tokens
            kw = dict(max_seq_len=4 * n + 256, max_batch_size=nb)
            text, tokens = WSD.from_pretrained(*pair, **kw), WSD.from_pretrained(*bare, **kw)
            # a late forced switch (k = n/2) keeps both phases long; EOS ignored; the text
            # mode keeps the default stop strings (scanned on every token)
            p = WSDParams(draft_max_tokens=n, max_new_tokens=n, chunk=a.chunk,
                          force_switch=n // 2, ignore_eos=True)
            prompt = "Tell me about the quick brown fox and the lazy dog."
            ids_p = text.pilot.tokenizer.encode("hello there, friend")
            ids_b = text.base.tokenizer.encode("[User] hello there, friend [Assistant]")
            prompts = [f"Tell me about the quick brown fox number {i} and the lazy dog."
                       for i in range(nb)]
            ids_ps = [text.pilot.tokenizer.encode(f"hello there, friend number {i}")
                      for i in range(nb)]
            ids_bs = [text.base.tokenizer.encode(f"[User] hello there, friend number {i} "
                                                 "[Assistant]") for i in range(nb)]
            modes = {"text (stop strings, detokenizer)":
                         (text, lambda: text.generate(prompt, p),
                          lambda B: text.generate(prompts[:B], p)),
                     "token-level (generate_ids, no tokenizer)":
                         (tokens, lambda: tokens.generate_ids(ids_p, ids_b, p),
                          lambda B: tokens.generate_ids(ids_ps[:B], ids_bs[:B], p))}
            for name, (wsd, run, run_b) in modes.items():
                print(f"one request, {name} ...", flush=True)
                res["modes"][name] = measure(wsd, run, a.reps, a.chunk)
            if sizes:
                for name, (wsd, run, run_b) in modes.items():
                    print(f"batched {sizes}, {name} ...", flush=True)
                    res["batched"][name] = measure_batched(wsd, run_b, sizes,
                                                           max(1, min(a.reps, 3)))
                if a.profile_batch:
                    for name, (wsd, run, run_b) in modes.items():
                        print(f"profile at batch {a.profile_batch}, {name} ...", flush=True)
                        res["profile"][name] = profile_batched(wsd, run_b, a.profile_batch)
    finally:
        torch.set_num_threads(threads)
    floors = {pr: floor_ms(pr, a.bw) for pr in PRESETS}
    res["floor_ms"] = floors
    f1, f8 = floors["llama3.2-1b"], floors["llama3.1-8b"]
    chunk_ms = a.chunk * f1 + f8         # a drafted chunk at the floor: c 1B steps + one 8B
    res["chunk_floor_ms"] = chunk_ms
    print(f"host bookkeeping of the WSD loop (CPU, torch {torch.__version__}, {a.threads} "
          f"thread(s), chunk {a.chunk}, {a.tokens} tokens, switch at {a.tokens // 2}); floors "
          f"at {a.bw:.0f} GB/s: 1B step {f1:.2f} ms, 8B step {f8:.2f} ms, drafted chunk "
          f"(1B + 8B) {chunk_ms:.2f} ms")
    for name, r in res["modes"].items():
        r["draft_frac_of_chunk"] = r["draft_us_per_chunk"] / (chunk_ms * 1e3)
        r["cont_frac_of_8b_step"] = r["cont_us_per_token"] / (f8 * 1e3)
        print(f"  one request, {name}:\n"
              f"    drafting: {r['draft_us_per_chunk']:.0f} us per chunk "
              f"= {r['draft_frac_of_chunk'] * 100:.2f}% of the chunk at the floor\n"
              f"    continuation: {r['cont_us_per_token']:.1f} "
              f"us per token = {r['cont_frac_of_8b_step'] * 100:.2f}% of an 8B step")
    if res["batched"]:
        res["batched_target"] = batched_fractions(res, a.chunk, f1, f8)
        print(batched_table(res))
    for name, pr in res["profile"].items():
        print(f"\ncProfile, batch {pr['batch']}, {name}: top functions by cumulative host "
              f"time (model calls cut out), µs per step over {pr['steps']} steps")
        for r in pr["top"][:15]:
            print(f"  {r['cumtime_us_per_step']:9.1f}  {r['tottime_us_per_step']:8.1f}  "
                  f"{r['calls_per_step']:7.1f}  {r['function']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def batched_fractions(res: dict, chunk: int, f1: float, f8: float) -> dict:
    """At the largest batch: host time per step against the device time of that step at
    the floors. A continuation step decodes `chunk` tokens per row (chunk 8B decode steps);
    a drafting step drafts `chunk` pilot tokens and scores them (chunk 1B steps + one 8B
    forward). The strict reading (host per step against ONE 8B decode step) is given too."""
    out = {}
    for name, by_b in res["batched"].items():
        B = max(by_b, key=int)
        k = by_b[B]["kinds"]
        row = {"batch": int(B), "8b_step_ms": f8}
        if "cont" in k:
            us = k["cont"]["host_us_per_step"]
            tpr = k["cont"]["tokens_per_row"]
            row["cont_host_us_per_step"] = us
            row["cont_host_us_per_token_position"] = us / tpr
            row["cont_frac_of_device_step"] = us / (tpr * f8 * 1e3)
            row["cont_frac_of_one_8b_step"] = us / (f8 * 1e3)
        if "draft" in k:
            us = k["draft"]["host_us_per_step"]
            tpr = k["draft"]["tokens_per_row"]
            row["draft_host_us_per_step"] = us
            row["draft_frac_of_device_step"] = us / ((tpr * f1 + f8) * 1e3)
            row["draft_frac_of_one_8b_step"] = us / (f8 * 1e3)
        out[name] = row
    return out


def batched_table(res: dict) -> str:
    """Markdown: host µs per step and per row per token against the batch size."""
    L = ["", "## Host time per step against batch size (CPU; model calls subtracted)", "",
         "| mode | batch | drafting µs/step | continuation µs/step | drafting µs/row/token "
         "| continuation µs/row/token | drafting: runner / rule (host part) / engine µs | "
         "continuation: runner / engine µs | model µs/step (cont) |",
         "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, by_b in res["batched"].items():
        short = name.split(" (")[0]
        for B, rec in by_b.items():
            k = rec["kinds"]
            d, c = k.get("draft", {}), k.get("cont", {})

            def g(x, key, fmt="{:.0f}"):
                return fmt.format(x[key]) if key in x else "\u2014"
            L.append(f"| {short} | {B} | {g(d, 'host_us_per_step')} | "
                     f"{g(c, 'host_us_per_step')} | {g(d, 'host_us_per_row_token', '{:.1f}')} | "
                     f"{g(c, 'host_us_per_row_token', '{:.1f}')} | "
                     f"{g(d, 'runner_us_per_step')} / {g(d, 'rule_in_host_us_per_step')} / "
                     f"{g(d, 'engine_us_per_step')} | {g(c, 'runner_us_per_step')} / "
                     f"{g(c, 'engine_us_per_step')} | {g(c, 'model_us_per_step')} |")
    L.append("")
    for name, t in res.get("batched_target", {}).items():
        short = name.split(" (")[0]
        if "cont_host_us_per_step" in t:
            L.append(f"- {short}, batch {t['batch']}: continuation step host "
                     f"{t['cont_host_us_per_step']:.0f} µs = "
                     f"{t['cont_host_us_per_token_position']:.0f} µs per token position = "
                     f"{t['cont_frac_of_device_step'] * 100:.1f}% of its device time at the "
                     f"floor ({t['8b_step_ms']:.2f} ms per 8B step; target <= 10%); against "
                     f"ONE 8B step {t['cont_frac_of_one_8b_step'] * 100:.1f}%")
        if "draft_host_us_per_step" in t:
            L.append(f"- {short}, batch {t['batch']}: drafting step host "
                     f"{t['draft_host_us_per_step']:.0f} µs = "
                     f"{t['draft_frac_of_device_step'] * 100:.1f}% of a drafted chunk at the "
                     f"floor (chunk 1B steps + one 8B scoring forward); against ONE 8B step "
                     f"{t['draft_frac_of_one_8b_step'] * 100:.1f}%")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
