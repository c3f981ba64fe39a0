"""The end-to-end benchmark suite (benchmarks/run.py) in its CPU smoke form: tiny shapes,
torch backend, every decode / WSD step run once, results.json / results.md (and the plots
when matplotlib is importable) written. The kernels suite is left out here (the Triton
interpreter makes it the slow part); `python -m benchmarks.run --cpu-smoke` runs it."""
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_cpu_smoke(tmp_path):
    from benchmarks.run import main
    assert main(["--cpu-smoke", "--suite", "decode,wsd", "--out", str(tmp_path)]) == 0
    R = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert R["meta"]["cpu_smoke"] and R["meta"]["versions"]["torch"] and R["meta"]["date"]
    assert _num(R["copy_gbps"])
    assert not R["errors"], R["errors"]
    assert not R["skipped"]

    # decode: our engine and the HF eager baseline, per preset, against the floor
    assert list(R["decode"]) == ["llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "qwen2.5-7b"]
    for preset, e in R["decode"].items():
        assert _num(e["floor_ms_per_token"]) and _num(e["floor_tok_s"])
        for key in ("engine_torch_eager", "hf_eager"):
            r = e["systems"][key]
            assert _num(r["decode_ms_per_token"]) and _num(r["tok_s"]), (preset, key, r)
            assert _num(r["frac_of_floor"]) and _num(r["e2e_tok_s"])
        assert "skipped" in e["systems"]["hf_compile"]   # for time; run on its own below
        assert "skipped" in e["systems"]["engine_graph"]      # no CUDA graphs on CPU
        assert "skipped" in e["systems"]["engine_graph_tuned"]
        pre = e["prefill"]                                      # the prompt prefill vs floor
        assert pre["prompt_len"] == R["meta"]["settings"]["prompt_len"]
        assert _num(pre["ms"]) and _num(pre["over_floor"]) and _num(pre["prompt_tok_s"])
        assert e["systems"]["hf_eager"]["init_std_down_proj"] > 0   # never zeros
    assert "## Decode" in md and "HF transformers eager generate" in md
    assert "Prefill (empty cache" in md and "| eager |" in md

    # wsd: forced switch points 4, 8 and never, next to base-only decoding
    assert len(R["wsd"]) == 2
    for key, e in R["wsd"].items():
        runs = e["runs"]
        assert [r["k"] for r in runs] == [4, 8, 0]
        assert [r["switch_index"] for r in runs] == [4, 8, 24]     # never: the whole draft
        for r in runs:
            assert _num(r["total_s"]) and _num(r["ideal_s"]) and _num(r["measured_over_ideal"])
            assert _num(r["speedup_vs_base_only"])
            assert set(r["timings"]) == {"prefill", "drafting", "scoring", "continuation"}
            assert sum(r["timings"].values()) <= r["total_s"] * 1.01
        assert runs[-1]["timings"]["continuation"] < runs[0]["timings"]["continuation"]
        assert _num(e["base_only"]["total_s"]) and _num(e["base_only"]["ideal_s"])
        ref = e["reference"]                  # the oracle on the same device, k = 8
        assert ref["switch_index"] == 8 and ref["draft_tokens"] == 24
        assert _num(ref["total_s"]) and _num(ref["speedup_of_engine"])
        assert set(ref["timings"]) == {"draft", "score", "continuation", "total"}
    assert "## WSD" in md and "base-only" in md and "reference (HF, 3 offline stages)" in md

    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "decode.png").stat().st_size > 1000
        assert (tmp_path / "wsd.png").stat().st_size > 1000


def test_bench_pairs_option(tmp_path, capsys):
    from benchmarks.run import main
    assert main(["--cpu-smoke", "--suite", "wsd", "--pairs", "llama3.2-3b+llama3.1-8b",
                 "--ks", "8", "--no-reference", "--no-plots", "--out", str(tmp_path)]) == 0
    R = json.loads((tmp_path / "results.json").read_text())
    assert list(R["wsd"]) == ["llama3.2-3b + llama3.1-8b"] and not R["errors"]
    with pytest.raises(SystemExit):
        main(["--cpu-smoke", "--pairs", "llama3.2-1b", "--out", str(tmp_path)])
    assert "--pairs takes PILOT+BASE" in capsys.readouterr().err


def test_bench_time_budget_skips_and_records(tmp_path):
    from benchmarks.run import main
    assert main(["--cpu-smoke", "--suite", "decode", "--preset", "llama3.2-1b",
                 "--time-budget", "0", "--no-plots", "--out", str(tmp_path)]) == 0
    R = json.loads((tmp_path / "results.json").read_text())
    assert len(R["skipped"]) == 4                  # copy bandwidth + 3 decode steps
    assert "## Skipped" in (tmp_path / "results.md").read_text()


def test_cli_bench_forwards(capsys):
    from wsd_engine.cli import main
    with pytest.raises(SystemExit) as ex:
        main(["bench", "--help"])
    assert ex.value.code == 0
    assert "--time-budget" in capsys.readouterr().out


def test_host_overhead_runs(tmp_path):
    """benchmarks/host_overhead.py (the C++-driver question): it runs and its numbers are
    positive and consistent (bookkeeping is part of the wall time)."""
    from benchmarks.host_overhead import main
    out = tmp_path / "ho.json"
    assert main(["--tokens", "32", "--reps", "1", "--out", str(out)]) == 0
    R = json.loads(out.read_text())
    assert len(R["modes"]) == 2
    for r in R["modes"].values():
        assert _num(r["draft_us_per_chunk"]) and _num(r["cont_us_per_token"])
        assert r["draft_book_s"] + r["cont_book_s"] < r["total_s"]
        assert r["draft_tokens"] == 16 and r["base_tokens"] == 16 and r["switch_index"] == 16
        assert _num(r["draft_frac_of_chunk"]) and _num(r["cont_frac_of_8b_step"])
    assert _num(R["chunk_floor_ms"])


def test_bench_checkpoints_against_reference(tmp_path):
    """--pilot/--base: the engine with the real rule against wsd_engine.reference on the
    same device, identical output (fp32 CPU) and a speed ratio."""
    from benchmarks.run import main
    from wsd_engine.synthetic import make_wsd_pair
    pilot, base = make_wsd_pair(str(tmp_path / "pair"), damp=0.02, perturb=0.05, sharpen=100.0)
    out = tmp_path / "out"
    assert main(["--cpu-smoke", "--suite", "wsd", "--ks", "8", "--no-reference", "--no-plots",
                 "--pilot", pilot, "--base", base, "--out", str(out)]) == 0
    R = json.loads((out / "results.json").read_text())
    assert not R["errors"], R["errors"]
    ck = R["wsd"]["checkpoints"]
    eng, ref = ck["engine"], ck["reference"]
    assert eng["switched"] and ref["switched"] and eng["switch_index"] == ref["switch_index"]
    assert ref["identical"] is True and _num(ref["speedup_of_engine"])
    assert "cpu" in ref["note"]
    for key, e in R["wsd"].items():
        if key != "checkpoints":
            assert e["reference"] == {"skipped": "--no-reference"}


def test_hf_compile_baseline_runs_on_cpu(tmp_path):
    # The HF static cache + torch.compile(mode="reduce-overhead") baseline, in its child
    # process as the suite runs it on a GPU (the CPU smoke skips it), at the smoke's tiny
    # 1B-like shape: it compiles, generates exactly n tokens and reports a time; a failing
    # child comes back as an error with its message, not a crash of the suite.
    from benchmarks.baselines import run_worker
    logs = []
    spec = {"kind": "hf_compile", "preset": "llama3.2-1b", "smoke": True, "device": "cpu",
            "dtype": "float32", "ids": [5, 6, 7, 8, 9, 10, 11, 12], "n": 6, "floor_ms": 1.0,
            "reps": 1}
    res = run_worker(spec, 600, str(tmp_path / "hf_compile.log"), logs.append)
    assert "error" not in res, res
    assert res["cache"] == "static" and "reduce-overhead" in res["compile"]
    assert _num(res["decode_ms_per_token"]) and _num(res["tok_s"]) and _num(res["e2e_s"])
    assert res["init_std_down_proj"] > 0 and len(res["warmup_s"]) == 2
    bad = run_worker(dict(spec, preset="no-such-preset"), 120, str(tmp_path / "bad.log"),
                     logs.append)
    assert "no-such-preset" in bad["error"], bad


def test_report_names_the_kernels_and_the_tuning():
    from benchmarks.report import _kernels_line
    plain, fused_pdl = dict(fused_gemv=False, pdl=False), dict(fused_gemv=True, pdl=True)
    e = {"decode_kernels": {"pilot": fused_pdl, "base": plain},
         "kernel_tuning": {"pilot": {"context": 512, "rows": [dict(plain, ms=1.25),
                                                               dict(fused_pdl, ms=0.9),
                                                               dict(plain, error="x")]}}}
    line = _kernels_line(e)[0]
    assert "pilot: fused gemv + PDL (tuned; step ms at 512 tokens: matmul + norm/SwiGLU " \
           "apart 1.250, fused gemv + PDL 0.900, matmul + norm/SwiGLU apart failed)" in line
    assert "base: matmul + norm/SwiGLU apart." in line
    assert _kernels_line({}) == []


def test_kernel_microbenchmarks_cpu_smoke(tmp_path):
    """Every kernel microbenchmark runs in its smoke form (interpreter, tiny shapes) through
    the suite's `kernels` step, checks its kernel against the reference and writes its JSON;
    a benchmark broken here would otherwise first fail in a GPU session."""
    from benchmarks.run import main
    assert main(["--cpu-smoke", "--suite", "kernels", "--no-plots", "--out", str(tmp_path)]) == 0
    R = json.loads((tmp_path / "results.json").read_text())
    assert not R["errors"], R["errors"]
    assert sorted(R["kernels"]) == ["attention", "gemv", "layers", "switch_score"]
    for name, res in R["kernels"].items():
        assert "returncode" not in res, (name, res)
        out = res["result"]
        rows = out.get("results", out.get("rows"))
        assert rows and not [r for r in rows if "error" in r], (name, rows)
        timed = [r for r in rows if not r.get("skipped")]
        assert timed and all(_num(r.get("ms", r.get("us"))) for r in timed), (name, rows[:2])
    att = R["kernels"]["attention"]["result"]
    assert att["ok"] and att["complete"] and all(r["max_abs_err"] < 1e-4 for r in att["rows"] if "max_abs_err" in r)
    ss = R["kernels"]["switch_score"]["result"]
    assert ss["max_abs_logp_err"] < 1e-4
    gemv = R["kernels"]["gemv"]["result"]
    assert gemv["complete"] and {r["impl"] for r in gemv["results"]} == {
        "gemv fused", "norm/swiglu kernel + F.linear", "F.linear alone"}


def test_backend_benchmark_cpu_smoke(tmp_path):
    """bench_backend: the triton and torch forwards of the 8B preset's tiny smoke shape
    agree (logits, argmax, greedy tokens) and both are timed."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from benchmarks.bench_backend import main
    out = tmp_path / "backend.json"
    main(["--cpu-smoke", "--out", str(out)])
    R = json.loads(out.read_text())
    assert R["logits_max_rel_diff"] < 1e-4 and R["argmax_agree"] == 1.0
    assert R["greedy_identical_prefix"] == R["greedy_len"] > 0
    for key in ("torch", "triton"):
        assert _num(R[key]["decode_ms"]) and _num(R[key]["score8_ms"]), (key, R[key])


def test_kernel_rows_keep_why_they_have_no_time(capsys):
    """A benchmark row that failed keeps its error (e.g. torch.compile of the reference
    crashing), one left out says so; both reach the table and results.md."""
    import torch

    from benchmarks.bench_switch_score import print_table, run_case
    from benchmarks.report import _kernels_section

    def boom():
        raise RuntimeError("compiler crashed\\nwith a long trace")
    rows = []
    run_case(rows, "c=8", {"torch_ref": lambda: torch.ones(8).sum(), "compiled": boom,
                           "left out": None}, nbytes=32, copy_gbps=1.0,
             device=torch.device("cpu"))
    by = {r["impl"]: r for r in rows}
    assert _num(by["torch_ref"]["ms"]) and by["torch_ref"]["speedup"] == 1.0
    assert by["compiled"]["ms"] is None and "RuntimeError: compiler crashed" in by["compiled"]["error"]
    assert by["left out"]["skipped"] and "error" not in by["left out"]
    print_table(rows, "t", 1.0, "CPU")
    out = capsys.readouterr().out
    assert "failed: RuntimeError: compiler crashed" in out and "| skipped |" in out
    md = "\\n".join(_kernels_section({"switch_score": {"result": {"results": rows}}}))
    assert "| c=8 | compiled | failed: RuntimeError: compiler crashed" in md
    assert "| c=8 | left out | skipped |" in md


def test_bench_graph_mode_branches_on_cpu(tmp_path, monkeypatch):
    """The suite's CUDA-graph branches (what a GPU session runs: the per-step graph row,
    the bucket-graph prefill, the start-up tuning, WSD with its batched decode graphs and
    the base-only baseline) on CPU through the triton interpreter, with eager stand-ins for
    the graphs and for the tuning's CUDA-event timing: every row is produced, none errors."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _graph_standins import eager_graphs, stub_decode_timing

    from benchmarks import suite
    from benchmarks.run import parse_args
    eager_graphs(monkeypatch)
    stub_decode_timing(monkeypatch)
    a = parse_args(["--cpu-smoke", "--suite", "decode,wsd", "--preset", "llama3.2-1b",
                    "--pairs", "llama3.2-1b+llama3.1-8b", "--ks", "4", "--steps", "4",
                    "--reps", "1", "--response", "8", "--prompt-len", "6", "--no-reference",
                    "--out", str(tmp_path)])
    b = suite.Bench(a)
    b.backend, b.graphs = "triton", True                  # as on a GPU
    b.decode_kernels = {"fused_gemv": None, "pdl": None, "tune_kernels": None}
    b.R["copy_gbps"] = 10.0
    b.decode_engine("llama3.2-1b")
    b.wsd_pair("llama3.2-1b", "llama3.1-8b")
    assert not b.R["errors"], [e["task"] + ": " + e["error"][:300] for e in b.R["errors"]]
    d = b.R["decode"]["llama3.2-1b"]
    assert set(d["systems"]) >= {"engine_graph", "engine_graph_tuned"}
    for key in ("engine_graph", "engine_graph_tuned"):
        assert _num(d["systems"][key]["decode_ms_per_token"]), (key, d["systems"][key])
    assert d["systems"]["engine_graph_tuned"]["tuning"]["chosen"] == {"fused_gemv": True,
                                                                      "pdl": False}
    assert _num(d["prefill"]["ms"]) and _num(d["prefill_graph"]["ms"])
    w = b.R["wsd"]["llama3.2-1b + llama3.1-8b"]
    assert set(w["kernel_tuning"]) == {"pilot", "base"} and w["cuda_graphs"]
    assert [r["k"] for r in w["runs"]] == [4] and _num(w["runs"][0]["measured_over_ideal"])
    assert w["runs"][0]["switch_index"] == 4 and _num(w["base_only"]["total_s"])
    from benchmarks.report import render_md
    md = render_md(b.R)
    assert "| tiny (CPU smoke), as llama3.2-1b | CUDA graph (bucket) | 6 |" in md
    assert "kernels tuned on this card" in md and "(tuned; step ms at" in md
