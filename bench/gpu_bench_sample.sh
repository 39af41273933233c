#!/usr/bin/env bash
# Sampling benchmark on the GPU machine (JSON lines to $OUT/bench_sample.jsonl): `fluxtrain sample
# --bench` at FLUX.1-dev dimensions with random weights (init-model --size flux-dev, bf16), 1024x1024,
# 28 steps, one image:
#   1. no condition;
#   2. one EasyControl subject condition (512x512, random latents, random rank-128 EasyControl LoRA)
#      with the condition KV cache;
#   3. the same without the KV cache (--no_kv_cache).
# The snapshot has no text encoders (init-model writes them only for tiny sizes): the T5 states
# (512 tokens) and pooled vectors are random, so the numbers are the transformer + autoencoder
# decode only. Prints a table at the end.
# Usage (repo root, after bench/gpu_build_and_bench.sh built build-gpu/): bash bench/gpu_bench_sample.sh
# CPU smoke test: SIZE=tiny DEVICE=cpu DTYPE=f32 PX=64 CPX=32 STEPS=2 B=build/fluxtrain bash bench/gpu_bench_sample.sh
set -euo pipefail
OUT=${OUT:-$PWD/out}
B=${B:-build-gpu/fluxtrain}
SIZE=${SIZE:-flux-dev} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bf16} PX=${PX:-1024} CPX=${CPX:-512} STEPS=${STEPS:-28}
RANK=${RANK:-128}
M=${MODEL_DIR:-/tmp/fluxtrain_bench_sample_model}
mkdir -p "$OUT"
J="$OUT/bench_sample.jsonl"
: > "$J"
if [ ! -e "$M/ae.safetensors" ]; then  # init-model writes the autoencoder last
  # bf16 on disk: half the bytes to write and read; the benchmark runs in bf16 anyway.
  $B init-model --size "$SIZE" --output_dir "$M" --dtype bf16 --layout bfl > /dev/null
fi
common=(sample --bench --pretrained_model_name_or_path "$M" --device "$DEVICE" --dtype "$DTYPE"
        --height "$PX" --width "$PX" --num_inference_steps "$STEPS" --cond_size "$CPX")
$B "${common[@]}" | tee -a "$J"
$B "${common[@]}" --bench_conditions 1 --bench_lora_rank "$RANK" | tee -a "$J"
$B "${common[@]}" --bench_conditions 1 --bench_lora_rank "$RANK" --no_kv_cache | tee -a "$J"
${PYTHON:-python3} - "$J" <<'PY'
import json, sys
print("size       steps conds kv_cache  s/image  s/step  peak GiB  cache GiB")
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    c = j["config"]
    print("%-10s %5d %5d %-8s %8.2f %7.3f %9.2f %10.3f" % ("%dx%d" % (c["width"], c["height"]), c["steps"],
          c["conditions"], "on" if c["kv_cache"] else "off", j["s_per_image"], j["s_per_step"], j["peak_gib"],
          j["kv_cache_gib"]))
PY
