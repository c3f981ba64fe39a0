"""The tp benchmark suite (benchmarks/tp.py, `python -m benchmarks.run --suite tp`), the
tensor-parallel host-memory measurement (benchmarks/load_memory.py --tp) and the multi-GPU
script benchmarks/gpu_tp.sh, on CPU: the smoke runs the GPU part's code paths at tiny
shapes (gloo, N = 1 and 2) and writes its JSON; a 1-GPU machine records why it skips; the
script is valid bash, its benchmark command parses, and without 2 GPUs it runs nothing."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from _script_helpers import budget, check_bash_syntax, default_steps, read
from _script_helpers import steps as script_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_tp.sh")

pytestmark = pytest.mark.usefixtures("no_process_left")


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_llama31_70b_preset():
    from wsd_engine.config import PRESETS, preset_config
    from wsd_engine.memory import weight_elements
    assert "llama3.1-70b" in PRESETS
    c = preset_config("llama3.1-70b")
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size) == (8192, 28672, 80, 64, 8, 128, 128256)
    assert c.rope.theta == 500000.0 and c.rope.type == "llama3" and c.rope.factor == 8.0
    assert (c.rope.low_freq_factor, c.rope.high_freq_factor,
            c.rope.original_max_position_embeddings) == (1.0, 4.0, 8192)
    assert c.max_position_embeddings == 131072 and c.dtype == torch.bfloat16
    assert not c.tie_word_embeddings
    assert weight_elements(c) == 70_553_706_496          # Llama-3.1-70B's parameter count


def test_gpu_skip_reasons():
    from benchmarks.tp import gpu_skip_reason
    assert gpu_skip_reason(False, cuda=False) == "no CUDA"
    one = "NCCL tensor parallelism needs one GPU per rank; this machine has 1"
    assert gpu_skip_reason(False, cuda=True, n_gpus=1) == one
    assert gpu_skip_reason(True, cuda=True, n_gpus=1) == one
    assert gpu_skip_reason(True, cuda=True, n_gpus=8) == "--cpu-smoke"
    assert gpu_skip_reason(False, cuda=True, n_gpus=2) is None


def test_one_gpu_machine_records_the_skip(monkeypatch, tmp_path):
    """gpu_task on a (faked) 1-GPU machine writes the skip row and starts nothing."""
    from benchmarks import tp
    from benchmarks.run import parse_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    a = parse_args(["--suite", "tp", "--out", str(tmp_path)])
    assert not a.cpu_smoke and a.tp_sizes == [2, 4, 8] and a.tp_presets == ["llama3.1-70b"]
    assert a.tp_pairs == [("llama3.2-3b", "llama3.1-70b")] and a.tp_ks == [64, 256]
    logs = []
    b = types.SimpleNamespace(a=a, smoke=False, R={"skipped": []}, log=logs.append)
    tp.gpu_task(b)
    msg = "NCCL tensor parallelism needs one GPU per rank; this machine has 1"
    assert b.R["tp"]["gpu"] == {"skipped": msg}
    assert b.R["skipped"] == [{"task": "tp gpu", "reason": msg}]
    assert any(msg in x for x in logs)
    assert f"skipped: {msg}" in tp.render_md(b.R["tp"])


def test_floor_counts_weights_and_kv():
    from benchmarks.common import weight_bytes
    from benchmarks.tp import floor_of, smoke_config, total_weight_bytes
    from wsd_engine.loading import random_model
    cfg = smoke_config()
    m = random_model(cfg, "cpu", torch.float32, max_seq_len=64)
    f = floor_of(m, cfg, 1, 10.0, bw_gbps=1.0)
    assert f["weight_bytes_per_rank"] == weight_bytes(m) == total_weight_bytes(cfg, torch.float32)
    assert f["kv_bytes_per_rank"] == 2 * 4 * 4 * 32 * 4 * 10.0
    assert f["floor_ms_per_token"] == pytest.approx((f["total_bytes"]) / 1e9 * 1e3)
    assert f["floor_ms_total_over_n"] == pytest.approx(f["floor_ms_per_token"])


def test_tp_suite_cpu_smoke(tmp_path):
    from benchmarks.run import main
    assert main(["--cpu-smoke", "--suite", "tp", "--reps", "1", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    R = json.loads((tmp_path / "results.json").read_text())
    assert not R["errors"], R["errors"]
    c = R["tp"]["cpu"]
    assert c["sizes"] == [1, 2]
    (name, by_n), = c["decode"].items()
    assert name == "tiny (as llama3.1-70b)" and list(by_n) == ["1", "2"]
    for n, r in by_n.items():
        assert r["tp"] == int(n) and r["cuda_graph"] is False
        for key in ("decode_ms_per_token", "tok_s", "floor_ms_per_token", "frac_of_floor",
                    "weight_bytes_per_rank", "speedup_vs_1"):
            assert _num(r[key]), (n, key, r[key])
    assert by_n["1"]["speedup_vs_1"] == 1.0
    # rank 0 holds about half of the weights at N = 2 (vocabulary and heads split)
    ratio = by_n["2"]["weight_bytes_per_rank"] / by_n["1"]["weight_bytes_per_rank"]
    assert 0.45 < ratio < 0.55
    (key, w), = c["wsd"].items()
    assert key == "llama3.2-3b + llama3.1-70b" and list(w) == ["2"]
    r = w["2"]
    assert _num(r["base_only"]["total_s"]) and r["runs"][0]["k"] == 4
    assert r["runs"][0]["switch_index"] == 4 and _num(r["runs"][0]["speedup_vs_base_only"])
    g = R["tp"]["gpu"]
    assert "skipped" in g and any(s["task"] == "tp gpu" for s in R["skipped"])
    md = (tmp_path / "tp.md").read_text()
    assert "## Tensor parallelism (tp suite)" in md and "| tiny (as llama3.1-70b) | 2 |" in md
    assert "| llama3.2-3b + llama3.1-70b | 2 | base-only |" in md


def test_load_memory_tp_small(tmp_path):
    """The --tp measurement on a tiny checkpoint: one fresh process per N, every rank
    reported, ratios to N = 1."""
    from benchmarks.load_memory import measure_tp, tp_table, write_tp_checkpoint
    path = str(tmp_path / "ckpt")
    nbytes = write_tp_checkpoint(path, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)
    assert nbytes > 0 and os.path.isfile(os.path.join(path, "config.json"))
    res = measure_tp(path, [1, 2], nbytes, timeout=300)
    assert set(res["by_n"]) == {"1", "2"}
    for n, e in res["by_n"].items():
        assert "error" not in e, e
        assert [x["rank"] for x in e["ranks"]] == list(range(int(n)))
        for x in e["ranks"]:
            assert x["before"] > 0 and x["peak"] >= x["rss"] > 0
            assert "peak_ratio_to_n1" in x
    assert res["by_n"]["1"]["ranks"][0]["peak_ratio_to_n1"] == 1.0
    assert "| 2 | 1 |" in tp_table(res)


# ---- benchmarks/gpu_tp.sh -------------------------------------------------------------
def _text():
    return read(SCRIPT)


def test_gpu_tp_script_is_valid_bash():
    check_bash_syntax(SCRIPT)


def test_gpu_tp_script_steps_and_command_parse(monkeypatch):
    steps = script_steps(_text(), "/tmp/gpu_tp_out", {"TP_SIZES": "2,4,8"})
    assert sorted(n for n, _, _ in steps) == sorted(default_steps(_text()))
    assert all(0 < t <= budget(_text()) for _, t, _ in steps)
    argv = next(a for n, _, a in steps if n == "tp")
    assert argv[:3] == ["python", "-m", "benchmarks.run"]
    from benchmarks import run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    a = run.parse_args(argv[3:])
    assert not a.cpu_smoke and a.suites == ["tp"] and a.tp_sizes == [2, 4, 8]
    pyt = next(a for n, _, a in steps if n == "pytest")
    assert pyt[:3] == ["python", "-m", "pytest"] and pyt[pyt.index("-m", 3) + 1] == "gpu"
    assert os.path.isfile(os.path.join(ROOT, "tests", "test_tensor_parallel.py"))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2,
                    reason="a multi-GPU machine would run the whole script")
def test_gpu_tp_script_without_two_gpus_runs_nothing(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed here")
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    r = subprocess.run([bash, SCRIPT], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    msg = f"NCCL tensor parallelism needs one GPU per rank; this machine has {n}"
    assert msg in r.stdout
    assert json.loads((tmp_path / "out" / "tp_skipped.json").read_text()) == {"skipped": msg}
    assert "== tp" not in r.stdout and "== pytest" not in r.stdout
