#!/usr/bin/env bash
# One device call: kernels/gemm_tuned.h on the GPU. The CUDA build with the tests, the GemmTuned
# GPU tests, then the graph step (EasyControl's four configurations and plain LoRA at 512/768/1024
# px) for each FLUXTRAIN_GEMM_TUNING mode in MODES (default "1 0 heuristic": tuned, LibTorch's
# GEMMs, the cuBLASLt path with the heuristic's first choice). The tuned run starts from an empty
# tuning file, so its bench tunes during warm-up. Usage: bash bench/gpu_gemm_tuning_ab.sh (carry .deps)
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
BUILD_TESTS=1 PARTS=" " bash bench/gpu_session.sh || exit 1
timeout 120 build-gpu/tests/fluxtrain_tests --gtest_filter='GemmTuned*' > "$OUT/gemm_tests.log" 2>&1
echo "GemmTuned tests rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/gemm_tests.log" | tr '\n' ' ')"
grep -E "FAILED|Failure" -A4 "$OUT/gemm_tests.log" | head -20
export FLUXTRAIN_GEMM_TUNING_FILE=$OUT/gemm_tuning.txt
rm -f "$FLUXTRAIN_GEMM_TUNING_FILE"
B=build-gpu/fluxtrain
show() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    print(sys.argv[2], c["cond_size"], c["noise_size"], c["rank"], round(d["ms_per_step"], 1), round(d["model_tflops"]))
' "$1" "$2"; }
G="bench --device cuda --cuda_graph on --warmup 3 --iters 7 --gradient_checkpointing off"
for m in ${MODES:-1 0 heuristic}; do
  FLUXTRAIN_GEMM_TUNING=$m timeout 120 $B $G --configs 192/384/16,256/512/32,384/768/64,512/1024/128 > "$OUT/ec_$m.jsonl"
  show "$OUT/ec_$m.jsonl" "ec tuning=$m"
  FLUXTRAIN_GEMM_TUNING=$m timeout 100 $B $G --lora_mode standard --configs 0/512/32,0/768/64,0/1024/128 > "$OUT/standard_$m.jsonl"
  show "$OUT/standard_$m.jsonl" "standard tuning=$m"
done
wc -l "$FLUXTRAIN_GEMM_TUNING_FILE"
exit 0
