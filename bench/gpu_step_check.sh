#!/usr/bin/env bash
# One device call that checks and measures the training step after a change to the model or its
# kernels: the CUDA build with the tests; the fused-kernel GPU tests; eager vs CUDA-graph `train`
# bit-identity (tests/py/test_train_cuda_graph.py); the bench's graph step at the four EasyControl
# configurations without and with checkpointing (issue 15's targets); plain LoRA at 512/768/1024 px
# (ranks 32/64/128). About 5 minutes on the H200. Usage: bash bench/gpu_step_check.sh (carry .deps)
# AB_SWITCHES="FLUXTRAIN_MERGE_COND_GEMMS FLUXTRAIN_DGELU_EPILOGUE" adds, per variable, the four
# configurations' graph step with that variable set to 0 (an A/B of one implementation choice,
# in the same process environment as the default run; about 40 s each).
# AB_STANDARD="FLUXTRAIN_GELU_LINEAR_ADAPTERS" does the same for the plain-LoRA configurations.
# PROFILE="512/1024/128" and PROFILE_STANDARD="0/1024/128" add an eager kernel profile of those
# configurations (EasyControl, plain LoRA; bench/gpu_profile_kernels.sh), printed per kernel class
# with the top kernels (bench/profile_digest.py); about 30 s each. ATTR=gpu_memset,copy_cat traces
# those classes' kernels in the EasyControl profile back to the host ops that launch them.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
PARTS=graph_test source bench/gpu_kernel_tests.sh
B=build-gpu/fluxtrain
show() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    print(sys.argv[2], c["cond_size"], c["noise_size"], c["rank"], "ckpt" if c["gradient_checkpointing"] else "",
          round(d["ms_per_step"], 1), round(d["model_tflops"]), round(d["peak_gib"], 2))
' "$1" "$2"; }
G="bench --device cuda --cuda_graph on --warmup 3 --iters 7"
C=192/384/16,256/512/32,384/768/64,512/1024/128
timeout 150 $B $G --gradient_checkpointing off --configs $C > "$OUT/graph.jsonl"; show "$OUT/graph.jsonl" graph
timeout 150 $B $G --gradient_checkpointing on --configs $C > "$OUT/graph_ckpt.jsonl"; show "$OUT/graph_ckpt.jsonl" graph
timeout 150 $B $G --gradient_checkpointing off --lora_mode standard --configs 0/512/32,0/768/64,0/1024/128 \
  > "$OUT/graph_standard.jsonl"; show "$OUT/graph_standard.jsonl" standard
for v in ${AB_SWITCHES:-}; do
  env "$v=0" timeout 150 $B $G --gradient_checkpointing off --configs $C > "$OUT/graph_$v.jsonl"
  show "$OUT/graph_$v.jsonl" "$v=0"
done
for v in ${AB_STANDARD:-}; do
  env "$v=0" timeout 150 $B $G --gradient_checkpointing off --lora_mode standard --configs 0/512/32,0/768/64,0/1024/128 \
    > "$OUT/graph_standard_$v.jsonl"
  show "$OUT/graph_standard_$v.jsonl" "standard $v=0"
done
if [ -n "${PROFILE:-}" ]; then
  CONFIGS=$PROFILE TAG=ec ATTR=${ATTR:-} timeout 150 bash bench/gpu_profile_kernels.sh > /dev/null 2>&1
fi
if [ -n "${PROFILE_STANDARD:-}" ]; then
  CONFIGS=$PROFILE_STANDARD TAG=standard EXTRA="--lora_mode standard" timeout 150 bash bench/gpu_profile_kernels.sh \
    > /dev/null 2>&1
fi
[ -f "$OUT/kernel_classes.jsonl" ] && python3 bench/profile_digest.py "$OUT/kernel_classes.jsonl"
exit 0
