#!/usr/bin/env bash
# One call on a lent GPU machine (the workplace's device tool): train the runs of a spec
# file side by side on the one GPU, each `python3 -m model.cli train` (= `somna train`) in
# its own process for the same wall-clock budget, then pack everything under $OUT.
#   bash benchmarks/gpu_train.sh BUDGET_S SPEC_FILE
# SPEC_FILE: one run per line, "NAME ARGS..." (# comments allowed); the script adds
# --max-minutes, --threads 1 and --out. A small model's step is mostly kernel launches, so
# several processes share one GPU well (model/checkpoints/gpu-h100/README.md).
# Comes back: checkpoints.tar.gz (weights, configs, metrics), logs.tar.gz, summary.txt.
set -u
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 SOMNA_FORCE_TORCH_OPS=1
OUT=${OUT:-/tmp/gpu-train-out}
WORK=/tmp/gpu-train
BUDGET=${1:?budget seconds}
SPEC=${2:?spec file}
START=$(date +%s)
mkdir -p "$OUT" "$WORK/logs"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  echo "cores $(nproc)"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 >"$WORK/smi.csv" 2>&1 &
SMI=$!

# The budget covers training; start-up, the final evaluation and the save come on top.
MINUTES=$("$PY" -c "print(f'{($BUDGET - 20) / 60:.3f}')")
PIDS=()
NAMES=()
while read -r name args; do
  case "$name" in '' | \#*) continue ;; esac
  # shellcheck disable=SC2086  # args are words by design
  "$PY" -m model.cli train $args --threads 1 --max-minutes "$MINUTES" --out "$WORK/runs/$name" \
    >"$WORK/logs/$name.log" 2>&1 &
  PIDS+=($!)
  NAMES+=("$name")
done <"$SPEC"
for i in "${!PIDS[@]}"; do
  wait "${PIDS[$i]}"
  echo "${NAMES[$i]} exit $? after $(($(date +%s) - START)) s"
done
kill $SMI 2>/dev/null

"$PY" - "$WORK/runs" >"$WORK/summary.txt" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    m = run / "metrics.json"
    if not m.is_file():
        print(f"{run.name:28} no metrics"); continue
    m = json.loads(m.read_text())
    acc = {k: f"{v['mean']:.3f}±{v['std']:.3f}" for k, v in m["eval"]["accuracy"].items()
           if k == "all" or k.startswith("hops")}
    sps = m["train_seconds"] / max(1, m["steps"])
    print(f"{run.name:28} steps {m['steps']:5d} {sps:.3f} s/step loss {m['final_loss']:.3f} {acc}")
PY
cat "$WORK/summary.txt"
cp "$WORK/summary.txt" "$WORK/env.txt" "$OUT"/
(cd "$WORK/runs" && tar czf "$OUT/checkpoints.tar.gz" .)
(cd "$WORK" && tar czf "$OUT/logs.tar.gz" env.txt smi.csv logs)
echo "done after $(($(date +%s) - START)) s"
