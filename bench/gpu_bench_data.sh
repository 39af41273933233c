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
B=${B:-build-gpu/fluxtrain}
N=${N:-64}
mkdir -p "$OUT"
J="$OUT/bench_data.jsonl"
: > "$J"
$B vae --bench --device cuda --dtype bf16 --size flux --bench_sizes 512,1024,2048 --tile_from 2048 \
  --tile_size 512 --tile_overlap 128 | tee -a "$J"
$B vae --bench --device cuda --dtype bf16 --size flux --bench_sizes 2048 --tile_from 100000 --iters 3 | tee -a "$J"
W=/tmp/fluxtrain_bench_data
rm -rf "$W" && mkdir -p "$W/img"
$B vae --write_random "$W/model" --size flux > /dev/null
python3 - "$W" "$N" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import save_file
w, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
y, x = np.mgrid[0:1024, 0:1024]
with open(f"{w}/data.jsonl", "w") as f:
    for i in range(n):
        base = np.stack([(x + 7 * i) % 256, (y + 3 * i) % 256, (x + y) % 256], -1).astype(np.uint8)
        save_file({"rgb": base}, f"{w}/img/t{i}.safetensors")
        save_file({"rgb": np.ascontiguousarray(base[::2, ::2])}, f"{w}/img/c{i}.safetensors")
        f.write(json.dumps({"source": f"img/c{i}.safetensors", "caption": f"sample {i}",
                            "target": f"img/t{i}.safetensors"}) + "\n")
PY
$B prepare --pretrained_model_name_or_path "$W/model" --train_data_dir "$W/data.jsonl" --output "$W/data.h5" \
  --spatial_column source --noise_size 1024 --cond_size 512 --cache_latents --device cuda --vae_dtype bf16 \
  --latent_dtype bf16 --json 2> "$OUT/prepare.log" | grep '^{' | tee -a "$J"
# A second run on the unchanged input is a no-op (content hashes): its time is the hashing.
$B prepare --pretrained_model_name_or_path "$W/model" --train_data_dir "$W/data.jsonl" --output "$W/data.h5" \
  --spatial_column source --noise_size 1024 --cond_size 512 --cache_latents --device cuda --vae_dtype bf16 \
  --latent_dtype bf16 --json 2>> "$OUT/prepare.log" | grep '^{' | tee -a "$J"
tail -6 "$OUT/prepare.log"
