#!/usr/bin/env bash
# cuDNN attention on every call (issue 15): the output-gradient layout fix (src/model/blocks.cpp,
# sdpa) checked and measured in one device call. The build with tests; the fused-kernel and
# attention-policy GPU tests; the 2+4-block plain-LoRA step at 1024 px r128 that failed every time
# under cuDNN before the fix; then the graph step of plain LoRA at 512/768/1024 px and of
# EasyControl's four configurations, eager vs CUDA-graph `train` bit-identity, and the checkpointed
# step. (Session 10 ran it with a temporary switch that disabled the fix, to see the test and the
# reproducer fail without it.) Usage: bash bench/gpu_cudnn_probe.sh (carry .deps)
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
PARTS=" " source bench/gpu_kernel_tests.sh
B=build-gpu/fluxtrain
run() {
  timeout 60 env "$@" $B bench --device cuda --lora_mode standard --warmup 1 --iters 3 --configs 0/1024/128 \
    --blocks 2/4 --cuda_graph off --gradient_checkpointing off > /tmp/s.log 2>/tmp/e.log
  local rc=$?
  echo "reproducer [$*] rc=$rc $(grep -oE '"ms_per_step":[0-9.]+|"error":"[^"]{0,100}' /tmp/s.log | head -1)"
  return $rc
}
run FLUXTRAIN_SDP_CUDNN=1 || exit 0
export FLUXTRAIN_SDP_CUDNN=1
show() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    if "ms_per_step" not in d: print(sys.argv[2], c, d.get("error", "")[:120]); continue
    print(sys.argv[2], c["cond_size"], c["noise_size"], c["rank"], round(d["ms_per_step"], 1), round(d["model_tflops"]),
          round(d["peak_gib"], 2))
' "$1" "$2"; }
G="bench --device cuda --cuda_graph on --warmup 3 --iters 7"
timeout 150 $B $G --gradient_checkpointing off --lora_mode standard --configs 0/512/32,0/768/64,0/1024/128 \
  > "$OUT/standard_cudnn.jsonl"; show "$OUT/standard_cudnn.jsonl" "standard cudnn"
timeout 150 $B $G --gradient_checkpointing off --configs 192/384/16,256/512/32,384/768/64,512/1024/128 \
  > "$OUT/easycontrol_cudnn.jsonl"; show "$OUT/easycontrol_cudnn.jsonl" "easycontrol cudnn"
FLUXTRAIN_BIN=$B FLUXTRAIN_TEST_CUDA=1 timeout 120 python3 tests/py/test_train_cuda_graph.py > "$OUT/graph_test.log" 2>&1
echo "graph test rc=$?"; tail -4 "$OUT/graph_test.log"
timeout 150 $B $G --gradient_checkpointing on --configs 192/384/16,256/512/32,384/768/64,512/1024/128 \
  > "$OUT/easycontrol_cudnn_ckpt.jsonl"; show "$OUT/easycontrol_cudnn_ckpt.jsonl" "easycontrol cudnn ckpt"
