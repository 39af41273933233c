#!/usr/bin/env bash
# Session 7's device call: the CUDA build with the tests, the fused-kernel GPU tests, the bench's
# graph step at the four configurations (fused kernels + the cuDNN cross-length policy), the same
# with FLUXTRAIN_FUSED_KERNELS=0 at two of them (before/after), and plain-LoRA mode under the
# default policy with the low-memory options of the 4 GiB row (the session's crash).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
BUILD_TESTS=1 PARTS=" " bash bench/gpu_session.sh || exit 1
rm -f "$OUT/build.log" "$OUT/cmake.log"
B=build-gpu/fluxtrain
timeout 120 build-gpu/tests/fluxtrain_tests --gtest_filter='Fused*:Kernels*' > "$OUT/fused_tests.log" 2>&1
echo "fused tests rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/fused_tests.log" | tr '\n' ' ')"
grep -E "FAILED|Failure" -A4 "$OUT/fused_tests.log" | head -30
G="bench --device cuda --gradient_checkpointing off --cuda_graph on --warmup 3 --iters 7"
timeout 200 $B $G --configs 192/384/16,256/512/32,384/768/64,512/1024/128 | tee "$OUT/graph_fused.jsonl" | cut -c1-400
FLUXTRAIN_FUSED_KERNELS=0 timeout 100 $B $G --configs 192/384/16,512/1024/128 | tee "$OUT/graph_unfused.jsonl" | cut -c1-400
timeout 60 $B bench --device cuda --lora_mode standard --configs 0/512/32 --warmup 1 --iters 2 --cuda_graph off --blocks 2/4 \
  --gradient_checkpointing on --base_precision fp8 --fp8_modulation --blocks_to_swap -1 --offload_prefetch 1 | cut -c1-300
