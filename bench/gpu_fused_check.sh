#!/usr/bin/env bash
# Session 7's device call: the CUDA build with the tests, the fused-kernel GPU tests, the bench's
# graph step at the four configurations (fused kernels + the cuDNN cross-length policy), the same
# with FLUXTRAIN_FUSED_KERNELS=0 at two of them (before/after), and plain-LoRA mode under the
# default policy with the low-memory options of the 4 GiB row (the session's crash).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
PARTS=" " source bench/gpu_kernel_tests.sh
B=build-gpu/fluxtrain
G="bench --device cuda --gradient_checkpointing off --cuda_graph on --warmup 3 --iters 7"
timeout 200 $B $G --configs 192/384/16,256/512/32,384/768/64,512/1024/128 | tee "$OUT/graph_fused.jsonl" | cut -c1-400
FLUXTRAIN_FUSED_KERNELS=0 timeout 100 $B $G --configs 192/384/16,512/1024/128 | tee "$OUT/graph_unfused.jsonl" | cut -c1-400
timeout 60 $B bench --device cuda --lora_mode standard --configs 0/512/32 --warmup 1 --iters 2 --cuda_graph off --blocks 2/4 \
  --gradient_checkpointing on --base_precision fp8 --fp8_modulation --blocks_to_swap -1 --offload_prefetch 1 | cut -c1-300
