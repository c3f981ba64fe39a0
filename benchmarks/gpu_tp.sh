#!/usr/bin/env bash
# Tensor-parallel checks for a multi-GPU machine (NCCL: one GPU per rank, so >= 2 GPUs),
# each step under its own time limit; a step that would start after BUDGET seconds is
# skipped. Writes logs and JSON under ${OUT:-gpu_tp_out}. Run from the repository root (no
# install needed). Pick steps with STEPS="pytest tp" (default: both, in the order below);
# rank counts with SIZES="2 4 8" (those above the GPU count are left out).
# On a machine with fewer than 2 GPUs it says so and exits 0 after running nothing else.
set -u
OUT=${OUT:-gpu_tp_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
STEPS=${STEPS:-"pytest tp"}
BUDGET=${BUDGET:-540}
SIZES=${SIZES:-"2 4 8"}
TP_TESTS="tests/test_tensor_parallel.py"
T0=$(date +%s)
. "$(dirname "$0")/steps.sh"   # step NAME TIMEOUT CMD...: sets RC
{
NGPU=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
echo "== GPUs: $NGPU"
if [ "$NGPU" -lt 2 ]; then
  echo "NCCL tensor parallelism needs one GPU per rank; this machine has $NGPU: nothing to run"
  echo "{\"skipped\": \"NCCL tensor parallelism needs one GPU per rank; this machine has $NGPU\"}" > "$OUT/tp_skipped.json"
  exit 0
fi
# the rank counts this machine holds, as the tp suite's comma list
TP_SIZES=$(for n in $SIZES; do [ "$n" -le "$NGPU" ] && printf '%s,' "$n"; done | sed 's/,$//')
echo "== rank counts: ${TP_SIZES:-none}"
[ -n "$TP_SIZES" ] || exit 0
nvidia-smi --query-gpu=name,memory.total --format=csv
# the GPU tests of tensor parallelism, where the test file has any (the gpu mark)
if grep -q "pytest.mark.gpu\|pytestmark.*gpu" $TP_TESTS 2>/dev/null; then
  step pytest ${T_PYTEST:-150} python -m pytest -q -m gpu -p no:cacheprovider $TP_TESTS
else
  echo "== pytest: skipped ($TP_TESTS has no GPU tests)"
fi
# decode per token of llama3.1-70b split over N GPUs (+ N = 1 where it fits), and WSD
# 3B + 70B on the split base vs base-only at the largest N
step tp ${T_TP:-480} python -m benchmarks.run --suite tp --tp-sizes "$TP_SIZES" --no-plots --time-budget ${TP_BUDGET:-420} --out "$OUT/tp"
if [ -f "$OUT/tp/tp.md" ]; then cat "$OUT/tp/tp.md"; fi
} 2>&1 | tee "$OUT/gpu_tp.log"
exit ${PIPESTATUS[0]}
