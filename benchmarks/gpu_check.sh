#!/usr/bin/env bash
# One GPU session's checks, in order of importance, each under its own time limit so a
# failure or a slow step never eats the rest; a step that would start after BUDGET seconds
# is skipped. Writes logs and JSON under ${OUT:-gpu_out}, and ends with one table of every
# speed target (benchmarks/targets.py). Run from the repository root on a
# CUDA machine (no install needed). Pick steps with STEPS="pytest gemv ..." (default: all,
# in the order below).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
# the layout `pip install -e .` gives: kernels/ importable as wsd_engine.kernels
[ -e wsd_engine/kernels ] || ln -s ../kernels wsd_engine/kernels
STEPS=${STEPS:-"pdl pytest_new batch e2e attention gemv wsd_fast pytest switch backend layers hf_compile"}
BUDGET=${BUDGET:-540}
T0=$(date +%s)
. "$(dirname "$0")/steps.sh"   # step NAME TIMEOUT CMD...: sets RC
NEW_TESTS="tests/test_kernel_rows.py tests/test_graphs.py tests/test_pdl.py tests/test_triton_backend.py tests/test_kernel_gemv.py tests/test_kernel_attention.py::test_decode_append_gpu_llama8b_and_graph_replay"
{
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
# the GPU tests of what changed since the last GPU run first (PDL; n-step and prefill
# graphs, fused gemv, decode append mode with adaptive pieces, tuning), then the end-to-end
# decode (per-step, n-step, fused, PDL, tuned; eager and bucket-graph prefill) and WSD runs,
# the attention bench, the gemv sweep, the whole GPU suite and the other benchmarks last
# PDL first: if its GPU tests fail (a driver that cannot capture PDL launches, a race), the
# rest runs with PDL off, so one broken option cannot take the measurements down with it
step pdl ${T_PDL:-90} python -m pytest -q -m gpu -p no:cacheprovider -k pdl $NEW_TESTS
if [ "$RC" != skip ] && [ "$RC" != 0 ]; then
  export WSD_ENGINE_NO_PDL=1
  echo "== PDL tests failed (exit $RC): WSD_ENGINE_NO_PDL=1 for every step below"
fi
step pytest_new ${T_PYTEST_NEW:-150} python -m pytest -q -m gpu -p no:cacheprovider -k "not pdl" $NEW_TESTS
# the batched engine on the card: throughput at batch 1 / 4 / 16 / 32 (row graphs), the
# reference pipeline as the baseline
step batch ${T_BATCH:-200} python -m benchmarks.run --suite batch --batch-cpu-pairs none --no-plots --time-budget ${BATCH_BUDGET:-160} --out "$OUT/batch"
step e2e ${T_E2E:-240} python -m benchmarks.run --suite decode,wsd --preset llama3.1-8b llama3.2-1b --pairs llama3.2-1b+llama3.1-8b --no-hf-compile --no-torch-eager --time-budget ${E2E_BUDGET:-200} --out "$OUT/e2e"
# attention before the gemv sweep: it holds a target (8k decode, prefill vs SDPA); the sweep
# only informs the gemv launch shape (the start-up tuning already picks gemv vs cuBLAS)
step attention ${T_ATTN:-80} python benchmarks/bench_attention.py --out "$OUT/attention.json"
step gemv ${T_GEMV:-90} python benchmarks/bench_gemv.py --sweep --out "$OUT/gemv.json"
# WSD with the one-token fast path (fused gemv + PDL) at one switch point, no baselines
step wsd_fast ${T_WSD_FAST:-70} python -m benchmarks.run --suite wsd --pairs llama3.2-1b+llama3.1-8b --ks 64 --fused-gemv --pdl --no-reference --no-hf-compile --no-torch-eager --no-plots --out "$OUT/wsd_fast"
step pytest ${T_PYTEST:-150} python -m pytest -q -m gpu -p no:cacheprovider
step switch ${T_SWITCH:-75} python benchmarks/bench_switch_score.py --out "$OUT/switch_score.json"
step backend ${T_BACKEND:-90} python benchmarks/bench_backend.py --out "$OUT/backend.json"
step layers ${T_LAYERS:-40} python benchmarks/bench_layers.py --no-compile --out "$OUT/layers.json"
# the HF static cache + torch.compile baseline (issue 5 asks for its number or its error):
# the 1B, where compiling takes least; with this engine's decode and HF eager beside it
step hf_compile ${T_HF_COMPILE:-150} python -m benchmarks.run --suite decode --preset llama3.2-1b --no-torch-eager --no-plots --worker-timeout 120 --out "$OUT/hf_compile"
# every target of the kernel and end-to-end issues, from whatever the steps above wrote
echo "== targets"
python -m benchmarks.targets "$OUT" --json "$OUT/targets.json"
} 2>&1 | tee "$OUT/gpu_check.log"
