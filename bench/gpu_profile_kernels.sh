#!/usr/bin/env bash
# Where a step's GPU time goes (issue 15): `bench --profile` writes a Kineto Chrome trace of one
# eager step per configuration, bench/kernel_classes.py sums its kernels by class. Prints one JSON
# line per trace (kernel count, kernel ms, per-class ms and share, top kernels) to
# $OUT/kernel_classes.jsonl. Run after the CUDA build (bench/gpu_session.sh builds it).
#   CONFIGS="192/384/16,512/1024/128" CKPT=off EXTRA="--lora_mode standard" bash bench/gpu_profile_kernels.sh
# ATTR=copy_cat,elementwise also traces those classes' kernels back to the host ops that launch them.
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:-$PWD/out}
B=${B:-build-gpu/fluxtrain}
mkdir -p "$OUT/traces"
$B bench --device cuda --configs "${CONFIGS:-192/384/16,256/512/32,384/768/64,512/1024/128}" \
  --gradient_checkpointing "${CKPT:-off}" --cuda_graph off --warmup 2 --iters 3 ${EXTRA:-} \
  --profile "$OUT/traces/${TAG:-step}" | tee -a "$OUT/profile_bench.jsonl"
python3 bench/kernel_classes.py ${ATTR:+--attribute "$ATTR"} "$OUT"/traces/${TAG:-step}_*.json | tee -a "$OUT/kernel_classes.jsonl"
rm -f "$OUT"/traces/${TAG:-step}_*.json   # large; the summary is what comes back
