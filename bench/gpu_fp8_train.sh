#!/usr/bin/env bash
# fp8 base weights in `fluxtrain train` at FLUX.1-dev size (issue 14): after bench/gpu_train_loop.sh
# (which leaves /tmp/flux-dev, /tmp/flux-data-192-384.h5 and the bf16 run /tmp/run-192-384-16-on),
# the same 30 updates with fp8 base weights (modulation included), every block streamed from host
# memory and checkpointing: the loss curve against bf16, peak host RSS (the blocks read from the
# BFL file's mapping), peak GPU memory and s/update, from both runs' metrics.jsonl.
set -euo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
B=build-gpu/fluxtrain
c=192; n=384; r=16
$B train --pretrained_model_name_or_path /tmp/flux-dev --train_data /tmp/flux-data-$c-$n.h5 --output_dir /tmp/run-fp8 \
  --device cuda --mixed_precision bf16 --ranks $r --network_alphas $r --cond_size $c --noise_size $n \
  --train_batch_size 1 --gradient_accumulation_steps 1 --max_train_steps 30 --validation_steps 0 \
  --checkpointing_steps 100000 --report_to none --seed 1 --base_precision fp8 --fp8_modulation --blocks_to_swap -1 \
  --gradient_checkpointing 1 > "$OUT/train-fp8.log" 2>&1
cp /tmp/run-fp8/metrics.jsonl "$OUT/metrics-fp8.jsonl"
cp /tmp/run-$c-$n-$r-on/metrics.jsonl "$OUT/metrics-bf16.jsonl"
python3 - "$OUT/metrics-bf16.jsonl" "$OUT/metrics-fp8.jsonl" <<'PY'
import json, statistics, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
print("step  loss bf16  loss fp8")
for x, y in zip(a, b):
    print(f'{x["step"]:4}  {x["loss"]:.4f}     {y["loss"]:.4f}')
for name, m in (("bf16 resident", a), ("fp8 streamed", b)):
    print(json.dumps({"name": "fp8_train", "run": name, "peak_host_rss_gib": max(x["peak_host_rss_gib"] for x in m),
                      "peak_gpu_gib": max(x.get("peak_gpu_gib", 0) for x in m),
                      "s_per_update_median": statistics.median(x["s_per_step"] for x in m[5:]),
                      "mean_loss": statistics.mean(x["loss"] for x in m)}))
PY
