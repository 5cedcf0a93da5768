#!/usr/bin/env bash
# One call on a lent GPU machine (the workplace's device tool), all within about 9 minutes:
#   1. fla parity against the fp64 torch oracle (benchmarks/gpu_check.py --parity-only),
#      in the background while
#   2. the facts curriculum trains several variants side by side (model/curriculum.py),
#   3. then batched-sleep timings, torch ops vs fla (gpu_check.py --timing-only),
#   4. and everything is packed under $OUT (at most 8 files come back).
# Usage there:  bash benchmarks/gpu_session.sh [TRAIN_BUDGET_S] [VARIANT ...]
# A carried .whl/ (fla-core) is installed first; without it the fla rows report an error.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-session-out}
WORK=/tmp/gpu-session
BUDGET=${1:-400}
shift || true
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(n4:100 n4:101 n4:102 n1:100 n1:101 n1:102 full:100 full:101 n2:100)
START=$(date +%s)
mkdir -p "$OUT" "$WORK"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
  echo "cores $(nproc)"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 >"$WORK/smi.csv" 2>&1 &
SMI=$!
timeout 240 python3 -m benchmarks.gpu_check --parity-only --json "$WORK/gpu-parity.json" \
  >"$WORK/gpu-parity.log" 2>&1 &
PARITY=$!
# Training: torch ops (fla's first compile would eat a short stage; parity says if it is safe).
SOMNA_FORCE_TORCH_OPS=1 python3 -m model.curriculum --budget-s "$BUDGET" --out "$WORK/train" \
  "${VARIANTS[@]}" >"$WORK/curriculum.log" 2>&1
echo "curriculum exit $? after $(($(date +%s) - START)) s"
wait $PARITY
echo "parity exit $? after $(($(date +%s) - START)) s"
kill $SMI 2>/dev/null

LEFT=$((540 - ($(date +%s) - START) - 25))
if [ "$LEFT" -gt 30 ]; then
  timeout "$LEFT" python3 -m benchmarks.gpu_check --timing-only --json "$WORK/gpu-timing.json" \
    >"$WORK/gpu-timing.log" 2>&1
  echo "timing exit $? after $(($(date +%s) - START)) s"
fi

# Pack: final checkpoints (weights) in one file, everything else (logs, JSON) in another.
(cd "$WORK/train" && tar czf "$OUT/checkpoints.tar.gz" --exclude='*-stage*' facts-*)
(cd "$WORK" && tar czf "$OUT/logs.tar.gz" --exclude='*.safetensors' env.txt smi.csv ./*.log ./*.json train)
cp "$WORK"/*.json "$OUT"/ 2>/dev/null
cat "$WORK/curriculum.log" | tail -15
tail -30 "$WORK/gpu-parity.log"
tail -25 "$WORK/gpu-timing.log" 2>/dev/null
echo "done after $(($(date +%s) - START)) s"
