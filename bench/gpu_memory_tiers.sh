#!/usr/bin/env bash
# The memory tiers at FLUX.1-dev size (docs/memory.md), after bench/gpu_build_and_bench.sh has
# built build-gpu: the fp8 output error against bf16 on a fixed input (GPU-only unit test), then
# one JSON line per tier and mode (bench/gpu_memory_tiers.py). Writes $OUT/memory_tiers.jsonl.
#   bash bench/gpu_memory_tiers.sh [--tiers standard,ultra-low] [--no_resident]
set -euo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
B=build-gpu/fluxtrain
$B doctor --configs configs | tee "$OUT/doctor.txt" || true
FLUXTRAIN_FP8_FLUX_DEV=1 build-gpu/tests/fluxtrain_tests --gtest_filter='Fp8Weights.FluxDev*:Fp8.Cuda*' \
  2>&1 | grep -E "fp8|OK|FAILED|SKIPPED" | tee "$OUT/fp8_error.txt" || true
python3 bench/gpu_memory_tiers.py --bin "$B" --out "$OUT" "$@"
