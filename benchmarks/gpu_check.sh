#!/usr/bin/env bash
# One GPU session's checks, in order of importance, each under its own time limit so a
# failure or a slow step never eats the rest. Writes logs and JSON under ${OUT:-gpu_out}.
# Run from the repository root on a CUDA machine (no install needed).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
# the layout `pip install -e .` gives: kernels/ importable as wsd_engine.kernels
[ -e wsd_engine/kernels ] || ln -s ../kernels wsd_engine/kernels
{
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
echo "== pytest -m gpu"; timeout ${T_PYTEST:-120} python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -40
echo "== switch_score"; timeout ${T_SWITCH:-75} python benchmarks/bench_switch_score.py --out "$OUT/switch_score.json" 2>&1 | tail -25
echo "== attention"; timeout ${T_ATTN:-95} python benchmarks/bench_attention.py --out "$OUT/attention.json" 2>&1 | tail -25
echo "== backend"; timeout ${T_BACKEND:-90} python benchmarks/bench_backend.py --out "$OUT/backend.json" 2>&1 | tail -12
echo "== layers"; timeout ${T_LAYERS:-40} python benchmarks/bench_layers.py --no-compile --out "$OUT/layers.json" 2>&1 | tail -15
echo "== end to end"; timeout ${T_E2E:-300} python -m benchmarks.run --suite decode,wsd --time-budget ${E2E_BUDGET:-240} --out "$OUT/e2e" 2>&1 | tail -60
} 2>&1 | tee "$OUT/gpu_check.log"
