"""The batch benchmark suite (benchmarks/batch.py, `python -m benchmarks.run --suite batch`)
and the batched host-overhead measurement (benchmarks/host_overhead.py) at tiny sizes on
CPU: the JSON fields are numbers, the together / one-after-another ratio is computed, the
outputs of the two ways are token-identical, and the GPU part says it was skipped. The
GPU part's code runs here too, on CPU at tiny shapes (torch backend; the triton backend
through the interpreter is the slow test)."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_spread():
    from benchmarks.batch import spread
    assert spread(8, 64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert spread(8, 256, 1) == [132]
    assert spread(8, 256, 4) == [8, 91, 173, 256]
    assert len(spread(8, 256, 64)) == 64 and spread(8, 256, 64)[-1] == 256


def test_batch_suite_cpu_smoke(tmp_path):
    from benchmarks.run import main
    # an explicit --cpu-smoke: the demo pair, 4 requests of 32 tokens, batch 1, 2, 4
    assert main(["--cpu-smoke", "--suite", "batch", "--reps", "1", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    R = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert not R["errors"], R["errors"]
    e = R["batch"]["cpu"]["demo"]
    for key in ("batched_s", "sequential_s", "batched_tok_s", "sequential_tok_s", "ratio",
                "pilot_params", "base_params", "output_tokens"):
        assert _num(e[key]), (key, e[key])
    assert e["requests"] == 4 and e["output_tokens"] == 4 * 32
    assert e["switch_points"] == [4, 8, 12, 16]
    assert e["ratio"] == pytest.approx(e["sequential_s"] / e["batched_s"])
    assert e["ratio"] == pytest.approx(e["batched_tok_s"] / e["sequential_tok_s"])
    # token-identical: together, one after another and at most 2 at a time
    assert e["identical"] is True
    assert set(e["comparisons"]) == {"batched", "groups_of_2", "at_most_2"}
    assert all(c["identical"] and c["n_identical"] == 4 for c in e["comparisons"].values())
    for key in ("by_size", "by_size_capped"):      # groups of b; at most b running
        assert list(e[key]) == ["1", "2", "4"]
        for b, r in e[key].items():
            assert _num(r["tok_s"]) and _num(r["s"]) and _num(r["ratio_to_1"])
        assert e[key]["1"]["ratio_to_1"] == 1.0
        assert e[key]["4"]["ratio_to_1"] == pytest.approx(e["ratio"])
    # the GPU part: skipped, and says why
    g = R["batch"]["gpu"]
    assert g["skipped"] == ("no CUDA" if not torch.cuda.is_available() else "--cpu-smoke")
    assert any(s["task"] == "batch gpu" for s in R["skipped"])
    assert "## Batch: many requests in one engine" in md and "| demo |" in md
    assert "| demo | groups of b |" in md and "| demo | at most b running |" in md
    assert f"skipped: {g['skipped']}" in md


def test_batch_suite_args(tmp_path, capsys):
    from benchmarks.run import parse_args
    a = parse_args(["--suite", "batch", "--out", str(tmp_path)])
    if not torch.cuda.is_available():     # the full CPU defaults unless --cpu-smoke is given
        assert a.batch_cpu_pairs == ["demo", "30m"] and a.batch_requests == 8
        assert a.batch_max_new == 128 and a.batch_draft == 64 and a.batch_cpu_ks == [8, 64]
        assert a.batch_cpu_sizes == [1, 2, 4, 8] and a.batch_gpu_sizes == [1, 4, 16, 32]
    assert "batch" not in parse_args(["--out", str(tmp_path)]).suites   # only when named
    for bad in (["--batch-cpu-ks", "8"], ["--batch-cpu-ks", "8,100"],
                ["--batch-cpu-pairs", "nope"], ["--batch-gpu-sizes", "0,2"],
                ["--batch-cpu-sizes", "1,16"]):
        with pytest.raises(SystemExit):
            parse_args(["--suite", "batch", "--out", str(tmp_path)] + bad)
    assert "--batch-cpu-pairs" in capsys.readouterr().err


def test_batch_report_and_plot(tmp_path):
    """The markdown and the plot from a results dict holding every kind of entry."""
    from benchmarks.report import _batch_section
    cpu = {"pair": "demo", "pilot_params": 1e5, "base_params": 1e5, "threads": 1,
           "requests": 8, "max_new_tokens": 128, "switch_points": [8, 64],
           "batched_tok_s": 4000.0, "sequential_tok_s": 900.0, "ratio": 4.44,
           "identical": True, "by_size": {"1": {"tok_s": 900.0, "s": 1.0, "ratio_to_1": 1.0},
                                          "8": {"tok_s": 4000.0, "s": 0.2, "ratio_to_1": 4.44}}}
    gpu = {"pilot": "llama3.2-1b", "base": "llama3.1-8b", "dtype": "torch.bfloat16",
           "backend": "triton", "prompt_len": 128, "response": 512, "switch_range": [8, 256],
           "note": "n", "by_size": {"1": {"s": 10.0, "tok_s": 51.2, "ratio_to_1": 1.0},
                                    "16": {"s": 12.0, "tok_s": 682.0, "ratio_to_1": 13.3},
                                    "32": {"batch": 32, "skipped": "time budget spent"}},
           "meets_16_10x": True,
           "engine_batch": {"prompts": 64, "max_running": 32, "s": 30.0, "tok_s": 1092.0},
           "reference": {"note": "one prompt at a time", "mean_s_per_prompt": 20.0,
                         "extrapolated_s": 1280.0, "prompts": 64, "tok_s_extrapolated": 25.6,
                         "engine_speedup": 42.7}}
    md = "\n".join(_batch_section({"cpu": {"demo": cpu, "30m": {"error": "boom"}},
                                   "gpu": gpu}))
    assert "| demo | 0.1M / 0.1M | 1 | 8 x 128 | 8..64 | 4000 | 900 | 4.44x | yes |" in md
    assert "| 30m | error: boom |" in md
    assert "| 16 | 12.00 | 682 | 13.30 |" in md and "| 32 | time budget spent |" in md
    assert "Batch 16 >= 10x batch 1: met." in md and "42.7\u00d7 faster" in md
    if importlib.util.find_spec("matplotlib") is not None:
        from benchmarks.plots import make_plots
        R = {"meta": {"device": "cpu", "cpu_smoke": False}, "batch": {"cpu": {"demo": cpu},
                                                                     "gpu": gpu}}
        assert any("batch.png" in m and "wrote" in m for m in make_plots(R, str(tmp_path)))
        assert (tmp_path / "batch.png").stat().st_size > 1000


def _gpu_path_on_cpu(backend: str) -> dict:
    from benchmarks.batch import measure_gpu
    from benchmarks.common import model_cfg
    logs = []
    e = measure_gpu(logs.append, torch.device("cpu"), torch.float32, backend, "llama3.2-1b",
                    "llama3.1-8b", model_cfg("llama3.2-1b", True),
                    model_cfg("llama3.1-8b", True), prompt_len=8, response=16, chunk=8,
                    ks=(4, 12), sizes=[1, 2], n_prompts=3, ref_prompts=1)
    assert list(e["by_size"]) == ["1", "2"]
    for r in e["by_size"].values():
        assert _num(r["s"]) and _num(r["tok_s"]) and _num(r["ratio_to_1"])
    assert e["by_size"]["2"]["switch_points"] == [4, 12]
    eng, ref = e["engine_batch"], e["reference"]
    assert eng["output_tokens"] == 3 * 16 and _num(eng["tok_s"])
    assert _num(ref["tok_s_extrapolated"]) and _num(ref["engine_speedup"])
    assert ref["timed_indices"] == [1] and "cannot batch" in ref["note"]
    assert any("gpu batch 2" in m for m in logs)
    return e


def test_batch_gpu_code_path_on_cpu():
    """What the GPU part runs (random models, batch sizes, the prompt batch, the reference
    one prompt at a time), at tiny shapes on CPU with the torch backend."""
    _gpu_path_on_cpu("torch")


@pytest.mark.slow
def test_batch_gpu_code_path_on_cpu_triton():
    """The same with the triton backend (as on a GPU) through the Triton interpreter."""
    _gpu_path_on_cpu("triton")


def test_batch_gpu_out_of_time_is_recorded():
    from benchmarks.batch import measure_gpu
    from benchmarks.common import model_cfg
    e = measure_gpu(lambda m: None, torch.device("cpu"), torch.float32, "torch", "a", "b",
                    model_cfg("llama3.2-1b", True), model_cfg("llama3.1-8b", True),
                    prompt_len=8, response=16, chunk=8, ks=(4, 12), sizes=[1, 2],
                    n_prompts=2, ref_prompts=1, remaining=lambda: 0.0)
    assert e["by_size"]["1"] == {"batch": 1, "skipped": "time budget spent"}
    assert e["engine_batch"]["skipped"] == e["reference"]["skipped"] == "time budget spent"


def test_host_overhead_batched(tmp_path):
    """benchmarks/host_overhead.py's batched measurement: host time per step and per row
    per token by batch size, drafting and continuation steps apart, in both modes; the
    fraction of an 8B step at batch B; the host-only profile."""
    from benchmarks.host_overhead import main
    out = tmp_path / "ho.json"
    assert main(["--tokens", "32", "--reps", "1", "--batch-sizes", "1,4",
                 "--profile-batch", "4", "--out", str(out)]) == 0
    R = json.loads(out.read_text())
    assert len(R["batched"]) == 2
    for mode, by_b in R["batched"].items():
        assert list(by_b) == ["1", "4"]
        for B, rec in by_b.items():
            assert rec["tokens_per_run"] == int(B) * 32
            assert 0 < rec["host_s_per_run"] < rec["wall_s"]
            k = rec["kinds"]
            # all rows switch at 16: 1 admission step (prefill + first chunk), 1 more
            # drafting step, then 2 continuation steps of 8 tokens per row
            assert k["admit"]["steps"] == 1 and k["draft"]["steps"] == 1
            assert k["cont"]["steps"] == 2 and "mixed" not in k
            for kind in ("draft", "cont"):
                assert k[kind]["rows_per_step"] == int(B) and k[kind]["tokens_per_row"] == 8
                for f in ("host_us_per_step", "host_us_per_row_token", "model_us_per_step",
                          "runner_us_per_step", "engine_us_per_step"):
                    assert _num(k[kind][f]), (mode, B, kind, f, k[kind][f])
            assert _num(k["draft"]["rule_us_per_step"])       # in host or model time
        t = R["batched_target"][mode]
        assert t["batch"] == 4 and t["8b_step_ms"] == R["floor_ms"]["llama3.1-8b"]
        assert _num(t["cont_frac_of_device_step"]) and _num(t["draft_frac_of_device_step"])
        assert t["cont_frac_of_one_8b_step"] == pytest.approx(
            t["cont_frac_of_device_step"] * 8)
        prof = R["profile"][mode]
        assert prof["batch"] == 4 and len(prof["top"]) > 5
        assert all(r["cumtime_us_per_step"] >= 0 for r in prof["top"])
        # the model calls are cut out of the profile's clock
        fwd = [r for r in prof["top"] if "forward_rows" in r["function"]]
        assert all(r["cumtime_us_per_step"] < 50 for r in fwd), fwd
