#!/bin/bash
# Session 12 lease: (1) training with CUDA graphs (compile_mode=reduce-overhead) against the
# default mode, gpt row at the shakespeare_char shape, 2,000 steps each, one after the other;
# (2) the GPT-2 shape benchmark with --profile (gpt vs nanoGPT); (3) seed architectures with
# CUDA graphs at the shakespeare_char shape, one arch per run, while time lasts.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-530}
W=/tmp/work; L=$W/logs
mkdir -p "$L" results/logs
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }
{
    date -u
    cat .gpu/commit.txt
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
    nproc
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
bash -c "$(cat .gpu/prepare_command.txt)"; say "prepare rc=$?"

# 1. training, default vs reduce-overhead
for mode in default reduce-overhead; do
    spec=$(python3 - "$mode" <<'PY'
import json, re, sys
line = open(".gpu/train_commands.txt").readline()
spec = json.loads(re.search(r"--spec '(.*?)' --data", line).group(1))
assert spec["arch"] == "gpt", spec
spec["train"].update(compile_mode=sys.argv[1], token_budget=2000 * 64 * 256)
spec["experiment"] = f"gpt_{sys.argv[1]}"
print(json.dumps(spec))
PY
)
    out=results/cg/$mode; mkdir -p "$out"
    timeout -k 10 130 python3 -m archbench train --spec "$spec" --data results/data/shakespeare_char \
        --out "$out" --threads 2 > "$L/train-$mode.out" 2> "$L/train-$mode.log"
    say "train $mode rc=$? $(python3 -c "import json; s=json.load(open('$out/train_summary.json')); print({k: s.get(k) for k in ('best_val_loss','best_val_step','final_val_loss','compile_seconds','train_seconds','train_tokens_per_s','train_steps')})" 2>&1)"
    tail -3 "$L/train-$mode.log" | cut -c1-300
done

# 2. GPT-2 shape, gpt vs nanoGPT, with profiles
timeout -k 10 $(( $(left) < 170 ? $(left) : 170 )) python3 benchmarks/throughput.py --device cuda \
    --compile --shapes gpt2 --archs gpt --rounds 3 --steps 10 --nanogpt .gpu/model.py \
    --csv "$W/throughput-gpt2.csv" --markdown "$W/throughput-gpt2.md" --profile "$W/profiles" \
    > "$L/bench-gpt2.log" 2>&1
say "gpt2 bench rc=$?"; tail -10 "$L/bench-gpt2.log" | tee -a "$OUT/summary.txt"

# 3. seed architectures with CUDA graphs at the shakespeare_char shape
for arch in future_attention mtp futureformer hourglass fractalformer; do
    t=$(left); if [ "$t" -lt 40 ]; then say "no time left for $arch"; continue; fi
    timeout -k 5 $(( t < 120 ? t : 120 )) python3 benchmarks/throughput.py --device cuda \
        --compile-mode reduce-overhead --shapes shakespeare_char --archs "$arch" --rounds 3 --steps 20 \
        --csv "$W/sc-cg-$arch.csv" --markdown "$W/sc-cg-$arch.md" > "$L/bench-sc-cg-$arch.log" 2>&1
    say "sc reduce-overhead $arch rc=$?"; grep -E "^\| shakespeare_char" "$W/sc-cg-$arch.md" 2>/dev/null | tee -a "$OUT/summary.txt"
done
cp -r results/cg "$W/cg"; rm -f "$W"/cg/*/*.safetensors
tar czf "$OUT/work.tgz" -C "$W" .
say "all done"
