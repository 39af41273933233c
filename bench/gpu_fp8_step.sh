#!/usr/bin/env bash
# One device call for the fp8 step (issue 15 item 4): the CUDA build with the tests; the fused-kernel
# GPU tests with the fp8 output error against bf16 at FLUX.1-dev size (FLUXTRAIN_FP8_FLUX_DEV=1);
# eager vs CUDA-graph `train` bit-identity (fp8 dequantised and as fp8 GEMMs among its cases;
# PARTS= skips it); then the graph step at 384/768/64 and 512/1024/128 for each of VARIANTS:
#   bf16            the bf16 step
#   dequant         --base_precision fp8, blocks dequantised to bf16 per use
#   gemm            --base_precision fp8 --fp8_matmul (one-pass operand kernels)
#   gemm_aten       the same with ATen's operands and paths (FLUXTRAIN_FP8_OPERANDS=0)
#   gemm_fast       the same with fast accumulation in the forward products (FLUXTRAIN_FP8_FAST_ACCUM=1),
#                   and its output error against bf16
#   gemm_keep       --fp8_matmul --fp8_keep_transposed (the weights' transposed codes kept)
#   gemm_exact      --fp8_matmul with exact accumulation in forward too (FLUXTRAIN_FP8_FAST_ACCUM=0)
#   gemm_keep_nomlp gemm_keep with the MLP's linears as two nodes (FLUXTRAIN_FP8_MLP_NODE=0: GELU's
#                   backward as its own kernel, not in the quantiser)
#   gemm_keep_fastgelu gemm_keep with the logistic forms of GELU in the quantisers (FLUXTRAIN_FP8_FAST_GELU=1)
# PROFILE=1 adds an eager kernel profile of --fp8_matmul at 512/1024/128 (PROFILE_EXTRA: more flags).
# Usage: VARIANTS="bf16 gemm" bash bench/gpu_fp8_step.sh (carry .deps); all five: about 8 minutes.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
export FLUXTRAIN_FP8_FLUX_DEV=1
PARTS=${PARTS-graph_test} source bench/gpu_kernel_tests.sh
grep -E "^fp8 |fp8 matmul" "$OUT/fused_tests.log" | head -12
B=build-gpu/fluxtrain
show() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    print(sys.argv[2], c["cond_size"], c["noise_size"], c["rank"], round(d["ms_per_step"], 1),
          round(d["model_tflops"]), round(d["peak_gib"], 2))
' "$1" "$2"; }
G="bench --device cuda --cuda_graph on --warmup 3 --iters 7 --gradient_checkpointing off --configs ${CONFIGS:-384/768/64,512/1024/128}"
F8="--base_precision fp8 --fp8_matmul"
for v in ${VARIANTS:-bf16 dequant gemm gemm_aten gemm_fast}; do
  case $v in
    bf16) timeout 120 $B $G > "$OUT/$v.jsonl" ;;
    dequant) timeout 150 $B $G --base_precision fp8 > "$OUT/$v.jsonl" ;;
    gemm) timeout 150 $B $G $F8 > "$OUT/$v.jsonl" ;;
    gemm_aten) FLUXTRAIN_FP8_OPERANDS=0 timeout 150 $B $G $F8 > "$OUT/$v.jsonl" ;;
    gemm_keep) timeout 150 $B $G $F8 --fp8_keep_transposed > "$OUT/$v.jsonl" ;;
    gemm_keep_fastgelu) FLUXTRAIN_FP8_FAST_GELU=1 timeout 150 $B $G $F8 --fp8_keep_transposed > "$OUT/$v.jsonl" ;;
    gemm_keep_nomlp) FLUXTRAIN_FP8_MLP_NODE=0 timeout 150 $B $G $F8 --fp8_keep_transposed > "$OUT/$v.jsonl" ;;
    gemm_exact) FLUXTRAIN_FP8_FAST_ACCUM=0 timeout 150 $B $G $F8 > "$OUT/$v.jsonl" ;;
    gemm_fast)
      FLUXTRAIN_FP8_FAST_ACCUM=1 timeout 150 $B $G $F8 > "$OUT/$v.jsonl"
      FLUXTRAIN_FP8_FAST_ACCUM=1 timeout 100 build-gpu/tests/fluxtrain_tests --gtest_filter='Fp8Weights.FluxDevOutputErrorOnCuda' \
        2>&1 | grep -E "fp8 GEMMs" | sed 's/^/fast accumulation: /' ;;
  esac
  show "$OUT/$v.jsonl" "$v"
done
if [ -n "${PROFILE:-}" ]; then
  CONFIGS=512/1024/128 TAG=fp8 EXTRA="$F8 ${PROFILE_EXTRA:-}" timeout 150 bash bench/gpu_profile_kernels.sh > /dev/null 2>&1
  python3 bench/profile_digest.py "$OUT/kernel_classes.jsonl"
fi
exit 0
