#!/bin/bash
# One lease of a GPU: gpu-suite rows (seed 0) trained side by side for TRAIN_S seconds, then the
# benchmarks. Everything it keeps goes under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TRAIN_S=${TRAIN_S:-230}
BUDGET_S=${BUDGET_S:-560}
L=$OUT/logs
mkdir -p "$L" results/logs
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "[$(elapsed)s] $*"; }
{
    date -u
    cat .gpu/commit.txt
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
    nproc
} > "$L/machine.txt" 2>&1
cat "$L/machine.txt"

# 1. gpu-suite rows, seed 0, side by side on the one GPU (the commands `snakemake -n -p
#    --config suite=gpu 'seeds=[0]'` prints, --threads 2); SIGTERM at TRAIN_S seconds saves a
#    checkpoint and stops, as on a preempted cluster job.
bash -c "$(cat .gpu/prepare_command.txt)"
say "prepare rc=$?"
while read -r cmd; do
    dir=$(grep -oE 'results/gpu/[a-z0-9_]+/seed0' <<<"$cmd" | head -1)
    mkdir -p "$dir"
    (timeout -k 30 "$TRAIN_S" bash -c "exec $cmd"; echo "$dir rc=$?" >> "$L/train_rc.txt") &
done < .gpu/train_commands.txt
sleep 20
while [ "$(jobs -r | wc -l)" -gt 0 ]; do
    say "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for m in results/gpu/*/seed0/metrics*.csv; do echo "  $m: $(tail -1 "$m" | cut -c1-120)"; done
    sleep 30
done
wait
say "training done"
cat "$L/train_rc.txt"
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' results/gpu results/logs
say "tar rc=$?"

# 2. MFU at the GPT-2 shape: gpt against nanoGPT (compiled and eager).
timeout -k 10 200 python3 benchmarks/throughput.py --device cuda --compile --shapes gpt2 \
    --archs gpt --rounds 5 --steps 10 --nanogpt .gpu/model.py \
    --csv "$OUT/throughput-gpt2.csv" --markdown "$OUT/throughput-gpt2.md" > "$L/bench-gpt2.log" 2>&1
say "gpt2 bench rc=$?"
tail -12 "$L/bench-gpt2.log"

# 3. CUDA graphs at the shakespeare_char shape: gpt, default mode against reduce-overhead.
for mode in default reduce-overhead; do
    left=$(( BUDGET_S - $(elapsed) ))
    if [ "$left" -lt 45 ]; then say "no time left for $mode"; continue; fi
    timeout -k 5 $(( left < 90 ? left : 90 )) python3 benchmarks/throughput.py --device cuda \
        --compile-mode "$mode" --shapes shakespeare_char --archs gpt --rounds 5 --steps 20 \
        --csv "$OUT/throughput-sc-$mode.csv" --markdown "$OUT/throughput-sc-$mode.md" \
        > "$L/bench-sc-$mode.log" 2>&1
    say "shakespeare_char $mode rc=$?"
    tail -6 "$L/bench-sc-$mode.log"
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs
say "all done"
