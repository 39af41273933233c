#!/usr/bin/env bash
# One device call's part on GEMM choice (issue 15): bench/probe_cublaslt_algos.cu (cuBLASLt's first
# heuristic against the best of the candidates it offers (up to 16), per GEMM shape of the step; JSON lines in
# $OUT/cublaslt_algos.jsonl, summary printed), then the graph step with LibTorch's BLAS backend
# A/B: default against TORCH_BLAS_PREFER_CUBLASLT=1, plain LoRA (and EasyControl when EC=1).
# PROBE=0 skips the probe. The A/B needs build-gpu (run after bench/gpu_kernel_tests.sh or
# gpu_fp8_step.sh). Session 17's results: docs/benchmarks.md. Usage: bash bench/gpu_gemm_probe.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
if [ "${PROBE:-1}" = 1 ]; then
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
$NVCC -O2 -std=c++17 -arch=sm_90 bench/probe_cublaslt_algos.cu -lcublasLt -o /tmp/probe_cublaslt 2>&1 | tail -3
timeout 120 /tmp/probe_cublaslt > "$OUT/cublaslt_algos.jsonl"
python3 - "$OUT/cublaslt_algos.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for ws in (4, 32):
    r = [x for x in rows if x["workspace_mib"] == ws]
    f, b = sum(x["first_ms"] for x in r), sum(x["best_ms"] for x in r)
    print(f"workspace {ws} MiB: {len(r)} shapes, first {f:.2f} ms, best {b:.2f} ms ({100*(f-b)/f:.1f}% less)")
for x in rows:
    if x["workspace_mib"] == 32 and x["first_ms"] > 1.03 * x["best_ms"]:
        print(f'  {x["shape"]:28s} M={x["M"]:5d} first {x["first_ms"]:.3f} best {x["best_ms"]:.3f} (#{x["best_index"]}) {x["first_tflops"]}->{x["best_tflops"]} TFLOP/s')
PY
fi
B=build-gpu/fluxtrain
[ -x $B ] || exit 0
show() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    print(sys.argv[2], c["cond_size"], c["noise_size"], c["rank"], round(d["ms_per_step"], 1), round(d["model_tflops"]))
' "$1" "$2"; }
G="bench --device cuda --cuda_graph on --warmup 3 --iters 7 --gradient_checkpointing off"
S="--lora_mode standard --configs 0/512/32,0/768/64,0/1024/128"
timeout 100 $B $G $S > "$OUT/blas_default_standard.jsonl"; show "$OUT/blas_default_standard.jsonl" "standard default"
TORCH_BLAS_PREFER_CUBLASLT=1 timeout 100 $B $G $S > "$OUT/blas_lt_standard.jsonl"; show "$OUT/blas_lt_standard.jsonl" "standard cublaslt"
if [ -n "${EC:-}" ]; then
  C="--configs 192/384/16,256/512/32,384/768/64,512/1024/128"
  timeout 100 $B $G $C > "$OUT/blas_default_ec.jsonl"; show "$OUT/blas_default_ec.jsonl" "ec default"
  TORCH_BLAS_PREFER_CUBLASLT=1 timeout 100 $B $G $C > "$OUT/blas_lt_ec.jsonl"; show "$OUT/blas_lt_ec.jsonl" "ec cublaslt"
fi
exit 0
