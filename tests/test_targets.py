"""benchmarks.targets: one table of every speed target from a GPU session's outputs. Checked
here on hand-made outputs (so met / not met / not measured are each exercised with known
numbers) and on what the CPU smoke of the suite writes."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import targets  # noqa: E402


def _write(d, rel, obj):
    p = d / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))


def _status(t, prefix):
    rows = [r for r in t.rows if r["target"].startswith(prefix)]
    assert len(rows) == 1, (prefix, [r["target"] for r in t.rows])
    return rows[0]["status"], rows[0]["measured"]


def test_targets_from_hand_made_outputs(tmp_path):
    eng = lambda f, ms: {"frac_of_floor": f, "tok_s": 1e3 / ms, "decode_ms_per_token": ms}  # noqa: E731
    _write(tmp_path, "switch_score.json", {"results": [
        {"impl": "triton switch_score", "ms": 0.3, "frac_copy": 0.92, "speedup": 11.0},
        {"impl": "torch_ref", "ms": 3.0, "frac_copy": 0.09, "speedup": 1.0}]})
    _write(tmp_path, "attention.json", {"rows": [
        {"op": "decode", "ctx": 8192, "impl": "triton", "us": 20.0, "frac_copy": 0.40},
        {"op": "decode", "ctx": 8192, "impl": "triton_append[pdl]", "us": 12.0, "frac_copy": 0.66},
        {"op": "decode", "ctx": 8192, "impl": "sdpa", "us": 16.0, "frac_copy": 0.5},
        {"op": "prefill", "L": 8, "impl": "triton", "us": 14.0},
        {"op": "prefill", "L": 8, "impl": "sdpa_lower_right", "us": 44.0},
        {"op": "prefill", "L": 8, "impl": "sdpa_mask", "us": 64.0},
        {"op": "prefill", "L": 64, "impl": "triton", "us": 60.0},
        {"op": "prefill", "L": 64, "impl": "sdpa_lower_right", "us": 50.0}]})
    _write(tmp_path, "backend.json", {"triton_graph": {"decode_ms": 5.0, "score8_ms": 5.1,
                                                       "score8_over_decode": 1.02}})
    _write(tmp_path, "gemv.json", {"results": [
        {"case": "o N=4096 K=4096 pre=none", "impl": "gemv fused", "ms": 0.010, "frac_copy": 0.8},
        {"case": "o N=4096 K=4096 pre=none", "impl": "norm/swiglu kernel + F.linear",
         "ms": 0.012, "frac_copy": 0.7}]})
    _write(tmp_path, "e2e/results.json", {
        "decode": {
            "llama3.1-8b": {"systems": {"engine_graph": eng(0.71, 5.0),
                                        "engine_graph_tuned": eng(0.93, 3.8),
                                        "hf_eager": {"decode_ms_per_token": 56.0},
                                        "hf_compile": {"skipped": "--no-hf-compile"}},
                            "prefill": {"prompt_len": 128, "ms": 9.0, "over_floor": 2.5},
                            "prefill_graph": {"prompt_len": 128, "ms": 5.0, "over_floor": 1.4}},
            "llama3.2-1b": {"systems": {"engine_graph_steps_fused": eng(0.70, 1.0),
                                        "hf_eager": {"decode_ms_per_token": 8.0}}}},
        "wsd": {"llama3.2-1b + llama3.1-8b": {
            "runs": [{"k": 64, "measured_over_ideal": 1.1, "total_s": 2.0,
                      "speedup_vs_base_only": 1.2},
                     {"k": 0, "measured_over_ideal": 1.5, "total_s": 1.0,
                      "speedup_vs_base_only": 2.0},
                     {"k": 8, "error": "RuntimeError: boom"}],
            "reference": {"k": 64, "speedup_of_engine": 12.5, "total_s": 25.0},
            "kernel_tuning": {"base": {"chosen": {"fused_gemv": True, "pdl": True}, "rows": [
                {"fused_gemv": False, "pdl": False, "ms": 5.0},
                {"fused_gemv": True, "pdl": True, "ms": 4.0},
                {"fused_gemv": True, "pdl": False, "error": "X"}]}}}}})
    _write(tmp_path, "hf_compile/results.json", {"decode": {"llama3.2-1b": {"systems": {
        "hf_compile": {"error": "InductorError: crashed\n  at line 3"}}}}})

    t = targets.build(str(tmp_path))
    assert _status(t, "switch_score") == ("met", "92.0%")
    assert _status(t, "decode_attention at 8k") == ("NOT met", "66.0%")   # best triton row
    assert _status(t, "prefill_attention L=8") == ("met", "14.0 us vs 44.0 us")
    assert _status(t, "prefill_attention L=64")[0] == "NOT met"
    assert _status(t, "prefill_attention L=512")[0] == "not measured"
    assert _status(t, "decode llama3.1-8b >= 90%") == ("met", "93.0%")    # best engine row
    assert _status(t, "decode llama3.2-3b")[0] == "not measured"
    assert _status(t, "decode llama3.2-1b >= 75%") == ("NOT met", "70.0%")
    assert _status(t, "decode llama3.1-8b >= 10x") == ("met", "14.7x")
    assert _status(t, "decode llama3.2-1b >= 10x") == ("NOT met", "8.0x")
    assert _status(t, "prefill of a 128-token") == ("met", "1.40x")   # the graph row
    assert "eager 2.50x" in [r for r in t.rows if r["target"].startswith("prefill of")][0]["detail"]
    assert _status(t, "scoring a chunk of 8") == ("met", "1.02x")
    assert _status(t, "WSD <= 1.15x ideal: llama3.2-1b + llama3.1-8b [e2e] k=64")[0] == "met"
    assert _status(t, "WSD <= 1.15x ideal: llama3.2-1b + llama3.1-8b [e2e] k=never")[0] == "NOT met"
    assert _status(t, "WSD faster than base-only for k >= 64: llama3.2-1b + llama3.1-8b [e2e] "
                      "k=64")[0] == "met"
    assert _status(t, "WSD >= 10x") == ("met", "12.5x")
    assert _status(t, "start-up kernel choice") == ("met", "fused_gemv=True, pdl=True")
    st, val = _status(t, "HF static cache")
    assert st == "met" and val.startswith("llama3.2-1b: error: InductorError: crashed at line 3")
    assert _status(t, "gemv o vs") == ("met", "1.20x")
    md = t.markdown()
    assert "| 4 | decode_attention at 8k context >= 80% of the K/V read floor | 66.0% " in md
    assert "**NOT met**" in md and "not measured." in md


def test_targets_cli_on_an_empty_and_a_missing_folder(tmp_path, capsys):
    assert targets.main([str(tmp_path), "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "0 met, 0 not met" in out
    rows = json.loads((tmp_path / "t.json").read_text())
    assert rows and all(r["status"] == "not measured" for r in rows)
    assert targets.main([str(tmp_path / "nope")]) == 2
    (tmp_path / "backend.json").write_text("{not json")
    t = targets.build(str(tmp_path))
    assert _status(t, "backend.json readable")[0] == "NOT met"


def test_targets_read_the_suites_smoke_output(tmp_path):
    """The real output format of benchmarks.run (CPU smoke): rows are found, nothing raises."""
    from benchmarks.run import main
    assert main(["--cpu-smoke", "--suite", "decode,wsd", "--preset", "llama3.1-8b",
                 "--pairs", "llama3.2-1b+llama3.1-8b", "--ks", "8,0", "--ref-k", "8",
                 "--no-plots", "--out", str(tmp_path / "e2e")]) == 0
    t = targets.build(str(tmp_path))
    found = {r["target"] for r in t.rows if r["status"] != "not measured"}
    assert any(x.startswith("WSD <= 1.15x ideal") for x in found), found
    assert any(x.startswith("WSD >= 10x wsd_engine.reference") for x in found), found
    # the smoke runs the torch backend eagerly: no graph-decode row, so no decode verdict
    assert _status(t, "decode llama3.1-8b >= 90%") == ("not measured", "no engine row")
