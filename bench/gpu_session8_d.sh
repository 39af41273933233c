#!/usr/bin/env bash
# Session 8, device call D (run before the A/B option was removed again: it made no difference, see
# docs/benchmarks.md): the CUDA build with the tests; the fused-kernel GPU tests under both
# row orders of the QK RMSNorm + RoPE backward (FLUXTRAIN_QKNR_BWD_ORDER); eager vs CUDA-graph
# `train` bit-identity; the bench's graph step at the four configurations, without and with
# checkpointing, and the head-major backward order at the two large ones (A/B).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
BUILD_TESTS=1 PARTS="graph_test" bash bench/gpu_session.sh || exit 1
rm -f "$OUT/build.log" "$OUT/cmake.log"
B=build-gpu/fluxtrain
for order in qkv head; do
  FLUXTRAIN_QKNR_BWD_ORDER=$order timeout 120 build-gpu/tests/fluxtrain_tests --gtest_filter='Fused*:Kernels*' > "$OUT/fused_tests_$order.log" 2>&1
  echo "fused tests ($order) rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/fused_tests_$order.log" | tr '\n' ' ')"
  grep -E "FAILED|Failure" -A4 "$OUT/fused_tests_$order.log" | head -20
done
show() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    print(sys.argv[2], c["cond_size"], c["noise_size"], c["rank"], "ckpt" if c["gradient_checkpointing"] else "", round(d["ms_per_step"], 1), round(d["model_tflops"]), round(d["peak_gib"], 2))
' "$1" "$2"; }
G="bench --device cuda --cuda_graph on --warmup 3 --iters 7"
timeout 150 $B $G --gradient_checkpointing off --configs 192/384/16,256/512/32,384/768/64,512/1024/128 > "$OUT/graph.jsonl"; show "$OUT/graph.jsonl" graph
FLUXTRAIN_QKNR_BWD_ORDER=head timeout 100 $B $G --gradient_checkpointing off --configs 384/768/64,512/1024/128 > "$OUT/graph_head.jsonl"; show "$OUT/graph_head.jsonl" graph-head-order
timeout 150 $B $G --gradient_checkpointing on --configs 192/384/16,256/512/32,384/768/64,512/1024/128 > "$OUT/graph_ckpt.jsonl"; show "$OUT/graph_ckpt.jsonl" graph
ls "$OUT"
