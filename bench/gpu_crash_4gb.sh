#!/usr/bin/env bash
# Reproduces and narrows the low-vram-4gb crash of session 6 ("illegal memory access" in
# bench --lora_mode standard with fp8 + all blocks streamed + checkpointing) on a few blocks of
# FLUX.1-dev width: each variant leaves one ingredient out. One line per variant: ok or the error.
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:-$PWD/out}
B=${B:-build-gpu/fluxtrain}
BLOCKS=${BLOCKS:-2/4}
base="bench --device cuda --lora_mode standard --configs 0/512/32 --warmup 1 --iters 2 --cuda_graph off --blocks $BLOCKS"
low="--base_precision fp8 --fp8_modulation --blocks_to_swap -1 --offload_prefetch 1"
variant() {  # name, env, args
  local name=$1 envs=$2; shift 2
  local t0=$(date +%s)
  env $envs timeout 60 $B $base "$@" > /tmp/crash_$name.log 2>&1
  local rc=$?
  { echo "=== $name"; tail -40 /tmp/crash_$name.log; } >> "$OUT/crash.log"
  local line=$(grep -m1 -E '"ms_per_step"|"error"' /tmp/crash_$name.log | cut -c1-300)
  [ -z "$line" ] && line=$(grep -m1 -iE "error|illegal" /tmp/crash_$name.log | cut -c1-300)
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s: $line"
}
variant resident_nockpt "X=1" --gradient_checkpointing off
variant resident_ckpt "X=1" --gradient_checkpointing on
variant resident_ckpt_cudnn "FLUXTRAIN_SDP_CUDNN=1" --gradient_checkpointing on
variant streamed_bf16_ckpt "X=1" --gradient_checkpointing on --blocks_to_swap -1 --offload_prefetch 1
variant fp8_resident_ckpt "X=1" --gradient_checkpointing on --base_precision fp8 --fp8_modulation
variant full_ckpt "CUDA_LAUNCH_BLOCKING=1" --gradient_checkpointing on $low
variant full_nockpt "CUDA_LAUNCH_BLOCKING=1" --gradient_checkpointing off $low
variant full_ckpt_cudnn "FLUXTRAIN_SDP_CUDNN=1" --gradient_checkpointing on $low
variant full_ckpt_prefetch2 "X=1" --gradient_checkpointing on --base_precision fp8 --fp8_modulation --blocks_to_swap -1 --offload_prefetch 2
