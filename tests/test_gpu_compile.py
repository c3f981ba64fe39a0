"""Every Triton kernel compiles for a Hopper GPU (sm_90) at the configs its launcher picks
there, on this CPU machine: `benchmarks/compile_check.py` in a subprocess (the compiler
needs TRITON_INTERPRET unset, which this test session has set). The interpreter runs the
kernels' Python only; this catches what only the GPU compiler sees (names bound in one
branch, mismatched types across a runtime `if`, shared memory over the card's limit).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

pytestmark = pytest.mark.skipif(not PTXAS.exists(),
                                reason=f"Triton's NVIDIA backend has no ptxas ({PTXAS})")


def _run(args, tmp_path, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    r = _run(["-m", "benchmarks.compile_check", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["ok"] for row in rows)
    names = " ".join(row["kernel"] for row in rows)
    for kernel in ("decode_attention append+rope fused", "attention_combine",
                   "prefill_attention", "gemv", "rms_norm", "swiglu",
                   "switch_score c=", "switch_score_combine", "3b decode_attention",
                   "qwen7b gemv qkv (norm+res, bias)",
                   # Gemma-2: soft-capped, sliding-window attention at hd 256 / 128, capped scoring
                   "gemma2-9b decode_attention append+rope fused splits=32 softcap+window",
                   "gemma2-27b prefill_attention L=128 splits=1 softcap+window",
                   "gemma2-9b switch_score c=8 V=256000 d=3584 softcap",
                   # tensor parallelism: a shard's partials, the merge over the ranks
                   "switch_score_partials_merge c=8",
                   "switch_score_rows_combine from_partials tp=8 c=8 fp64"):
        assert kernel in names, f"no {kernel} config compiled"
    # bf16: the engine's decode paths and the scoring kernel do not spill tiles. (ptxas may
    # keep a scalar on a tiny stack frame: the 3B's PDL decode attention has an 8-byte frame,
    # 4 bytes spilled at 96 registers; a spilled tile costs kilobytes per thread.)
    for row in rows:
        bf16_model = row["kernel"].split()[0] in ("8b", "1b", "3b", "qwen7b", "tiny") and \
            row["kernel"].split()[1] != "fp32"
        if bf16_model and ("decode_attention" in row["kernel"]
                           or "switch_score c=8" in row["kernel"]):
            assert row["stack"] == "?" or row["stack"] <= 16, row
    # PDL (kernels/pdl.py), read off the PTX: one wait, the release after it; before the
    # wait a gemv loads its first weight tile and prefetches the next, decode attention
    # loads only its length and prefetches its first key blocks
    pdl_rows = [r for r in rows if "pdl" in r]
    assert len(pdl_rows) == 42                     # 7 model/dtype variants x (attention + 5 gemvs)
    for r in pdl_rows:
        o = r["pdl"]
        assert o["waits"] == 1 and o["releases"] == 1 and o["release_after_wait"], r
        assert o["prefetches_before_wait"] > 0, r
        if "decode_attention" in r["kernel"]:
            assert o["loads_before_wait"] == 1, r
        else:
            assert o["loads_before_wait"] > 0, r


def test_the_check_reports_a_kernel_that_does_not_compile(tmp_path):
    # A name bound in one arm of a runtime `if` runs in the interpreter (Python) but is
    # rejected by the compiler: the check must say so, not pass.
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _broken_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
            if tl.program_id(0) == 0:
                only_here = x * 2.0
            tl.store(y_ptr + offs, only_here, mask=offs < n)
    '''))
    script = textwrap.dedent('''
        import json
        from benchmarks.compile_check import compile_one
        from broken_kernel import _broken_kernel
        print(json.dumps(compile_one("broken", _broken_kernel, dict(BLOCK=128),
                                     {"x_ptr": "fp32", "y_ptr": "fp32"}, set(), 4, 1)))
    ''')
    r = _run(["-c", script], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["ok"] is False and "only_here" in row["error"], row
