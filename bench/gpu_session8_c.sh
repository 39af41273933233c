#!/usr/bin/env bash
# Session 8, device call C (issue 14): the four tiers measured before expandable segments were
# turned on for streamed single-process runs (session 7), measured again as shipped: low-memory
# runs only (their resident references are unchanged by the allocator setting).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
[ -x build-gpu/fluxtrain ] || { PARTS=" " bash bench/gpu_session.sh || exit 1; rm -f "$OUT/build.log" "$OUT/cmake.log"; }
timeout 560 python3 bench/gpu_memory_tiers.py --warmup 1 --iters 3 --no_resident \
  --tiers ${TIERS:-ultra-low,no-text-encoder,text-encoder-one-low-memory,standard} | cut -c1-1500
