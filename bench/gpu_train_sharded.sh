#!/usr/bin/env bash
# `fluxtrain train` at FLUX.1-dev size on one GPU, frozen weights resident vs sharded
# (`mpirun -np 1 ... --shard_weights`, NCCL): seconds per update and peak GPU memory
# (nvidia-smi, everything included). Runs after bench/gpu_build_and_bench.sh (uses build-gpu).
# Random bf16 weights and synthetic data at the low-memory preset's sizes (condition 256 px,
# target 512 px, 512 T5 tokens), rank 32, gradient accumulation 2. LAYOUT=bfl|diffusers.
set -euo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
B=build-gpu/fluxtrain
LAYOUT=${LAYOUT:-bfl}
STEPS=${STEPS:-8}
t0=$(date +%s)
$B init-model --size flux-dev --dtype bf16 --layout "$LAYOUT" --output_dir /tmp/flux-dev > /dev/null
$B synth-data --output /tmp/flux-data.h5 --size flux-dev --num_samples 32 --sizes 64 --cond_latent_size 32 \
  --text_len 512 > /dev/null
echo "model ($LAYOUT) and data: $(( $(date +%s) - t0 )) s"
common=(--pretrained_model_name_or_path /tmp/flux-dev --train_data /tmp/flux-data.h5 --device cuda
  --mixed_precision bf16 --ranks 32 --network_alphas 32 --cond_size 256 --noise_size 512 --train_batch_size 1
  --gradient_accumulation_steps 2 --max_train_steps "$STEPS" --validation_steps 0 --checkpointing_steps 100000
  --seed 1)
for mode in resident sharded; do
  for ckpt in 0 1; do
    run_dir=/tmp/run-$mode-$ckpt
    rm -rf "$run_dir"
    cmd=($B train "${common[@]}" --gradient_checkpointing "$ckpt" --output_dir "$run_dir")
    [ $mode = sharded ] && cmd=(mpirun --allow-run-as-root -np 1 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "${cmd[@]}" --shard_weights)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > /tmp/smi.txt &
    smi=$!
    s0=$(date +%s)
    "${cmd[@]}" > "$OUT/train-$mode-$ckpt.log" 2>&1 || { echo "$mode ckpt=$ckpt FAILED"; tail -5 "$OUT/train-$mode-$ckpt.log"; }
    kill $smi; wait $smi 2>/dev/null || true
    python3 - "$run_dir/metrics.jsonl" /tmp/smi.txt "$mode" "$ckpt" "$(( $(date +%s) - s0 ))" <<'PY'
import json, sys, statistics
m = [json.loads(l) for l in open(sys.argv[1])]
s = sorted(x["s_per_step"] for x in m[2:])
peak = max(int(l) for l in open(sys.argv[2]) if l.strip().isdigit())
print(json.dumps({"name": "train_update", "weights": sys.argv[3], "gradient_checkpointing": sys.argv[4] == "1",
                  "s_per_update_median": statistics.median(s), "updates_timed": len(s),
                  "peak_gpu_mib_nvidia_smi": peak, "wall_s_incl_load": int(sys.argv[5]),
                  "final_loss": m[-1]["loss"]}))
PY
  done
done | tee -a "$OUT/train.jsonl"
