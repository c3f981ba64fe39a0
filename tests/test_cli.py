"""The command line: demo on the built-in pair, generate with --pilot/--base and --model."""
import json

from wsd_engine.cli import demo_pair, main


def test_demo_switch_fires(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["switched"] and 6 <= out["switch_index"] < out["draft_tokens"] + 1
    assert out["text"] and out["base_tokens"] > 0


def test_generate_text_output_marks_the_draft(tmp_path, capsys):
    pilot, base = demo_pair(str(tmp_path))
    rc = main(["generate", "--pilot", pilot, "--base", base, "--prompt", "Hello there",
               "--draft-max-tokens", "32", "--max-new-tokens", "40", "--chunk", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "\u00ab" in text and "k = " in text and "timings (s)" in text


def test_generate_single_model_and_errors(tmp_path, capsys):
    pilot, base = demo_pair(str(tmp_path))
    assert main(["generate", "--model", base, "--prompt", "Hi", "--max-new-tokens", "5",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    assert main(["generate", "--pilot", pilot, "--base", base, "--prompt", "Hi",
                 "--threshold", "1.5", "--draft-max-tokens", "8", "--max-new-tokens", "8"]) == 1
    assert "threshold" in capsys.readouterr().err
    assert main(["generate", "--pilot", pilot, "--prompt", "Hi"]) == 2


def test_cuda_graphs_flag_needs_cuda_and_triton(tmp_path, capsys):
    pilot, base = demo_pair(str(tmp_path))
    assert main(["generate", "--model", base, "--prompt", "Hi", "--cuda-graphs"]) == 1
    assert "CUDA graphs need device='cuda' and backend='triton'" in capsys.readouterr().err
    assert main(["demo", "--dir", str(tmp_path), "--cuda-graphs"]) == 1
    assert "ConfigError" in capsys.readouterr().err
    assert main(["generate", "--model", base, "--prompt", "Hi", "--cuda-graphs",
                 "--no-tune"]) == 1
    assert "CUDA graphs need device='cuda' and backend='triton'" in capsys.readouterr().err


def test_decode_kernel_flags(tmp_path, capsys):
    """--fused-gemv / --pdl: the triton backend's one-token kernels; a clear error on the
    torch backend. The triton run gives the same text as the torch one."""
    pilot, base = demo_pair(str(tmp_path))
    args = ["generate", "--pilot", pilot, "--base", base, "--prompt", "Hi", "--json",
            "--draft-max-tokens", "12", "--max-new-tokens", "16"]
    assert main(args + ["--fused-gemv"]) == 1
    assert "fused_gemv needs backend='triton'" in capsys.readouterr().err
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(args + ["--backend", "triton", "--fused-gemv", "--pdl"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want["token_ids"] and got["switch_index"] == want["switch_index"]
