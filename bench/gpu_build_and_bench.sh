#!/usr/bin/env bash
# Builds fluxtrain with CUDA on the GPU machine, runs the unit tests, a CUDA-vs-CPU forward
# check, and the LoRA-step benchmark. Usage (repo root, .deps/ holding the Boost and
# nlohmann-json .debs, see README): bash bench/gpu_build_and_bench.sh [bench args...]
# Writes logs and bench.jsonl to $OUT (or ./out). SKIP_TESTS, SKIP_RESIDENT, SKIP_SHARDED=1 leave
# parts out; SHARDED_CONFIGS, SHARDED_CKPT, SHARDED_ITERS set the sharded comparison.
set -euo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLUXTRAIN_CUDA=ON \
  -DFLUXTRAIN_TORCH_ROOT="$TORCH" -DFLUXTRAIN_PYTHON=python3 -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="/tmp/deps/usr;$TORCH/share/cmake" ${NCCL_LIB:+-DNCCL_ROOT=$NCCL_LIB} > "$OUT/cmake.log" 2>&1 \
  || { tail -40 "$OUT/cmake.log"; exit 1; }
ninja -C build-gpu -j16 > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ -z "${SKIP_TESTS:-}" ]; then
(cd build-gpu && { ctest -L unit -j8 --output-on-failure > "$OUT/ctest.log" 2>&1 || true; tail -4 "$OUT/ctest.log"; })
# Multi-rank tests with one GPU: NCCL communicator and the sharded model on CUDA.
if [ -x build-gpu/tests/fluxtrain_mpi_tests ]; then
  timeout 300 mpirun --allow-run-as-root -np 1 build-gpu/tests/fluxtrain_mpi_tests > "$OUT/mpi_gpu.log" 2>&1 \
    && echo "mpi tests on GPU (np 1): $(grep -E 'PASSED|FAILED' "$OUT/mpi_gpu.log" | tr '\n' ' ')" \
    || { echo "mpi tests on GPU FAILED"; grep -E "FAILED|Failure|error" -A3 "$OUT/mpi_gpu.log" | head -30; }
fi
fi
# CUDA vs CPU forward of the tiny model, with a condition (float32).
B=build-gpu/fluxtrain
$B init-model --size tiny --output_dir /tmp/tiny > /dev/null
python3 tests/py/make_forward_inputs.py /tmp/tiny_in.safetensors --cond 1 > /dev/null
$B forward --pretrained_model_name_or_path /tmp/tiny --inputs /tmp/tiny_in.safetensors --output /tmp/o_cpu.safetensors > /dev/null
$B forward --pretrained_model_name_or_path /tmp/tiny --inputs /tmp/tiny_in.safetensors --output /tmp/o_gpu.safetensors --device cuda > /dev/null
python3 -c "
from safetensors.torch import load_file
a=load_file('/tmp/o_cpu.safetensors')['output'].double(); b=load_file('/tmp/o_gpu.safetensors')['output'].double()
print('cuda vs cpu forward (tiny, f32): rel err %.2e' % ((a-b).abs().max()/a.abs().max()))"
[ -n "${SKIP_RESIDENT:-}" ] && : > "$OUT/bench.jsonl" || $B bench --device cuda "$@" | tee "$OUT/bench.jsonl"
# Sharded frozen weights vs resident, alternated in one process (one rank: the in-place gather
# moves no data; the provider, NCCL calls and events still run for every block).
if [ -z "${SKIP_SHARDED:-}" ]; then
  mpirun --allow-run-as-root -np 1 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE $B bench --device cuda --sharded \
    --configs ${SHARDED_CONFIGS:-384/768/64} --gradient_checkpointing ${SHARDED_CKPT:-both} --cuda_graph off \
    --compare_resident --warmup 3 --iters ${SHARDED_ITERS:-9} | tee -a "$OUT/bench.jsonl"
fi
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
print("cond/noise/rank ckpt  exec        ms/step  host_ms  TFLOP/s  peak GiB")
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    c = j["config"]
    tag = "%d/%d/%d" % (c["cond_size"], c["noise_size"], c["rank"])
    ck = "on " if c["gradient_checkpointing"] else "off"
    ex = c.get("execution", "graph" if c.get("cuda_graph") else "eager") + ("+shard" if j.get("sharded") else "")
    if "error" in j:
        print("%-15s %s  %-10s %s" % (tag, ck, ex, j["error"][:100]))
    else:
        extra = ""
        if "sharded_overhead_pct" in j:
            extra = "  resident %.1f ms in alternation: overhead %+.1f%%; gather pass %.1f ms" % (
                j["resident_ms_per_step"], j["sharded_overhead_pct"], j["gather"]["pass_ms"])
        print("%-15s %s  %-10s %8.1f %8.1f %8.0f %9.1f%s" % (tag, ck, ex, j["ms_per_step"], j["host_ms_per_step"], j["model_tflops"], j["peak_gib"], extra))
PY
