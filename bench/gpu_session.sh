#!/usr/bin/env bash
# One device call: the CUDA build (reused when build-gpu is already there) plus what PARTS names:
#   graph_test  tests/py/test_train_cuda_graph.py on the GPU (eager vs CUDA-graph train runs)
#   unit        ctest -L unit on the GPU build
#   standard    bench --lora_mode standard at 512/768/1024 px, ranks 32/64/128 (graph, no checkpointing)
#   train_loop  bench/gpu_train_loop.sh (train s/update vs bench graph step, four configurations)
# Usage: PARTS="graph_test standard" bash bench/gpu_session.sh   (carry .deps)
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
t0=$(date +%s)
if [ ! -x build-gpu/fluxtrain ] || [ -n "${REBUILD:-}" ]; then
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLUXTRAIN_CUDA=ON \
    -DFLUXTRAIN_TORCH_ROOT="$TORCH" -DFLUXTRAIN_PYTHON=python3 -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="/tmp/deps/usr;$TORCH/share/cmake" ${NCCL_LIB:+-DNCCL_ROOT=$NCCL_LIB} > "$OUT/cmake.log" 2>&1 \
    || { tail -40 "$OUT/cmake.log"; exit 1; }
fi
ninja -C build-gpu -j16 fluxtrain ${BUILD_TESTS:+fluxtrain_tests} > "$OUT/build.log" 2>&1 \
  || { grep -E "error|FAILED" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
B=build-gpu/fluxtrain
for part in ${PARTS:-graph_test standard}; do
  s0=$(date +%s)
  case $part in
    graph_test)
      FLUXTRAIN_BIN=$B FLUXTRAIN_TEST_CUDA=1 python3 tests/py/test_train_cuda_graph.py > "$OUT/graph_test.log" 2>&1; tail -12 "$OUT/graph_test.log" ;;
    unit)
      (cd build-gpu && ctest -L unit -j8 --output-on-failure > "$OUT/ctest.log" 2>&1; tail -4 "$OUT/ctest.log") ;;
    standard)
      $B bench --device cuda --lora_mode standard --configs 0/512/32,0/768/64,0/1024/128 \
        --gradient_checkpointing off --cuda_graph on --warmup 3 --iters 9 | tee "$OUT/bench_standard.jsonl" ;;
    train_loop)
      bash bench/gpu_train_loop.sh ;;
  esac
  echo "$part: $(( $(date +%s) - s0 )) s"
done
