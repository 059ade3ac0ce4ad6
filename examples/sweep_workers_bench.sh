#!/bin/bash
# Wall time of one 6-run grid (LoRA r = 1..32 on the CPU SST-2 recipe, a small subset) with 1 worker, then with
# 2 workers sharing the study, every worker on 1 thread (OMP_NUM_THREADS=1). Prints a Markdown table.
#
#   HF_HUB_OFFLINE=1 HF_HUB_CACHE=../shared/hf-hub examples/sweep_workers_bench.sh runs/bench/sweep_workers [ROWS]
#
# ROWS (default 512) training rows per run; 256 validation rows; one evaluation at the end; no checkpoints.
set -euo pipefail
OUT=${1:?usage: examples/sweep_workers_bench.sh OUT_DIR [ROWS]}
ROWS=${2:-512}
RECIPE=recipes/cpu/sst2_lora.yaml
ARGS=("$RECIPE" peft.r=1,2,4,8,16,32 'peft.alpha=2*peft.r' --set "data.max_train_samples=$ROWS"
      --set data.max_eval_samples=256 --set training.save_steps=100000 --set training.eval_steps=0
      --set 'output.report_to=[]')
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf "$OUT/one" "$OUT/two"
mkdir -p "$OUT"

start=$(date +%s.%N)
python scripts/sweep.py "${ARGS[@]}" --out "$OUT/one" >"$OUT/one.log" 2>&1
one=$(echo "$(date +%s.%N) - $start" | bc)

start=$(date +%s.%N)
python scripts/sweep.py "${ARGS[@]}" --out "$OUT/two" >"$OUT/two-a.log" 2>&1 &
a=$!
python scripts/sweep.py "${ARGS[@]}" --out "$OUT/two" >"$OUT/two-b.log" 2>&1 &
b=$!
wait $a
wait $b
two=$(echo "$(date +%s.%N) - $start" | bc)

complete() { grep -c ',complete,' "$1/results.csv" || true; }
echo "| workers (1 thread each) | runs complete | wall time (s) | speed-up |"
echo "|---|---|---|---|"
printf '| 1 | %s | %.0f | 1.00 |\n' "$(complete "$OUT/one")" "$one"
printf '| 2 | %s | %.0f | %.2f |\n' "$(complete "$OUT/two")" "$two" "$(echo "$one / $two" | bc -l)"
echo "CPU: $(lscpu | grep 'Model name' | sed 's/.*: *//'), $(nproc --all) cores; load average at the end:"
uptime
