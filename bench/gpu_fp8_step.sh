#!/usr/bin/env bash
# One device call for the fp8 step (issue 15 item 4): the CUDA build with the tests; the fused-kernel
# GPU tests with the fp8 output error against bf16 at FLUX.1-dev size (FLUXTRAIN_FP8_FLUX_DEV=1);
# eager vs CUDA-graph `train` bit-identity (fp8 dequantised and as fp8 GEMMs among its cases);
# then the graph step at 384/768/64 and 512/1024/128: bf16, fp8 dequantised per block
# (--base_precision fp8), fp8 GEMMs (--fp8_matmul) with the one-pass operand kernels and with ATen's
# (FLUXTRAIN_FP8_OPERANDS=0, the path before them). PROFILE=1 adds an eager kernel profile of
# --fp8_matmul at 512/1024/128. About 7 minutes on the H200. Usage: bash bench/gpu_fp8_step.sh (carry .deps)
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
timeout 120 $B $G > "$OUT/bf16.jsonl"; show "$OUT/bf16.jsonl" bf16
timeout 150 $B $G --base_precision fp8 > "$OUT/fp8_dequant.jsonl"; show "$OUT/fp8_dequant.jsonl" fp8-dequantised
timeout 150 $B $G --base_precision fp8 --fp8_matmul > "$OUT/fp8_matmul.jsonl"; show "$OUT/fp8_matmul.jsonl" fp8-gemm
FLUXTRAIN_FP8_OPERANDS=0 timeout 150 $B $G --base_precision fp8 --fp8_matmul > "$OUT/fp8_matmul_aten.jsonl"
show "$OUT/fp8_matmul_aten.jsonl" fp8-gemm-aten-operands
if [ -n "${PROFILE:-}" ]; then
  CONFIGS=512/1024/128 TAG=fp8 EXTRA="--base_precision fp8 --fp8_matmul" timeout 150 bash bench/gpu_profile_kernels.sh \
    > /dev/null 2>&1
  python3 bench/profile_digest.py "$OUT/kernel_classes.jsonl"
fi
exit 0
