#!/bin/bash
# Session 12 lease, second command: the six gpu-suite rows (seed 0) trained side by side with
# compile_mode=reduce-overhead (CUDA graphs), otherwise the exact specs of the H200 run of
# 2026-12-04 (whose curves are in report/reference-gpu/h200-curve-*), SIGTERM at TRAIN_S.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; TRAIN_S=${TRAIN_S:-200}
mkdir -p results/logs
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary2.txt"; }
bash -c "$(cat .gpu/prepare_command.txt)"; say "prepare rc=$?"
while read -r cmd; do
    cmd=${cmd/\"compile\": true,/\"compile\": true, \"compile_mode\": \"reduce-overhead\",}
    dir=$(grep -oE 'results/gpu/[a-z0-9_]+/seed0' <<<"$cmd" | head -1)
    mkdir -p "$dir"
    (timeout -k 30 "$TRAIN_S" bash -c "exec $cmd"; say "$dir rc=$?") &
done < .gpu/train_commands.txt
sleep 60
while [ "$(jobs -r | wc -l)" -gt 0 ]; do
    say "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for m in results/gpu/*/seed0/metrics*.csv; do echo "  $m: $(tail -1 "$m" | cut -c1-100)"; done
    sleep 30
done
wait
grep -h "compile_mode" results/gpu/gpt/seed0/*.json 2>/dev/null | head -2
tar czf "$OUT/runs2.tgz" --exclude='*.safetensors' results/gpu results/logs
say "done"
