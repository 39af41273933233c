#!/usr/bin/env bash
# Data-side benchmark on the GPU machine (JSON lines to $OUT/bench_data.jsonl):
#  1. the FLUX autoencoder (random weights at FLUX size, bf16): encode and decode ms and peak GiB
#     at 512 and 1024 px untiled, 2048 px tiled (512 px tiles, 128 px overlap) and untiled;
#  2. `fluxtrain prepare --cache_latents` on N generated 1024x1024 targets with 512x512 spatial
#     conditions: images/s, bytes per sample (bf16 latents). The GPU image has no libvips, so the
#     images are given pre-decoded (.safetensors "rgb", which prepare reads like image files):
#     decoding is not in this number (measured on the CPU with `fluxtrain image`, see docs).
# Usage (repo root, after bench/gpu_build_and_bench.sh built build-gpu/): bash bench/gpu_bench_data.sh
set -euo pipefail
OUT=${OUT:-$PWD/out}
source bench/gpu_env.sh
B=${B:-build-gpu/fluxtrain}
N=${N:-64}
SIZE=${SIZE:-flux} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bf16} PX=${PX:-1024} CPX=${CPX:-512}
VAE_SIZES=${VAE_SIZES:-512,1024,2048} TILE_FROM=${TILE_FROM:-2048} TILE=${TILE:-512} OVERLAP=${OVERLAP:-128}
# CPU smoke test at tiny sizes: SIZE=tiny DEVICE=cpu DTYPE=f32 PX=128 CPX=64 N=4 VAE_SIZES=64,128 TILE_FROM=128 TILE=64 OVERLAP=16 B=build/fluxtrain
mkdir -p "$OUT"
J="$OUT/bench_data.jsonl"
: > "$J"
$B vae --bench --device $DEVICE --dtype $DTYPE --size $SIZE --bench_sizes $VAE_SIZES --tile_from $TILE_FROM \
  --tile_size $TILE --tile_overlap $OVERLAP | tee -a "$J"
# The largest size untiled too (memory and time without tiling).
$B vae --bench --device $DEVICE --dtype $DTYPE --size $SIZE --bench_sizes ${VAE_SIZES##*,} --tile_from 100000 \
  --iters 3 | tee -a "$J"
W=/tmp/fluxtrain_bench_data
rm -rf "$W" && mkdir -p "$W/img"
$B vae --write_random "$W/model" --size $SIZE > /dev/null
${PYTHON:-python3} - "$W" "$N" "$PX" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import save_file
w, n, px = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
y, x = np.mgrid[0:px, 0:px]
with open(f"{w}/data.jsonl", "w") as f:
    for i in range(n):
        base = np.stack([(x + 7 * i) % 256, (y + 3 * i) % 256, (x + y) % 256], -1).astype(np.uint8)
        save_file({"rgb": base}, f"{w}/img/t{i}.safetensors")
        save_file({"rgb": np.ascontiguousarray(base[::2, ::2])}, f"{w}/img/c{i}.safetensors")
        f.write(json.dumps({"source": f"img/c{i}.safetensors", "caption": f"sample {i}",
                            "target": f"img/t{i}.safetensors"}) + "\n")
PY
$B prepare --pretrained_model_name_or_path "$W/model" --train_data_dir "$W/data.jsonl" --output "$W/data.h5" \
  --spatial_column source --noise_size $PX --cond_size $CPX --cache_latents --device $DEVICE --vae_dtype $DTYPE \
  --latent_dtype bf16 --json 2> "$OUT/prepare.log" | grep '^{' | tee -a "$J"
# A second run on the unchanged input is a no-op (content hashes): its time is the hashing.
$B prepare --pretrained_model_name_or_path "$W/model" --train_data_dir "$W/data.jsonl" --output "$W/data.h5" \
  --spatial_column source --noise_size $PX --cond_size $CPX --cache_latents --device $DEVICE --vae_dtype $DTYPE \
  --latent_dtype bf16 --json 2>> "$OUT/prepare.log" | grep '^{' | tee -a "$J"
tail -6 "$OUT/prepare.log"
