#!/usr/bin/env bash
# Nsight Compute's view of chosen kernels in one eager bench step (issue 15): speed of light,
# occupancy, warp stalls, memory workload, for the first LAUNCHES launches of each kernel name
# (a regex) in KERNELS. Full reports in $OUT/ncu_<name>.txt; the key lines are printed.
#   KERNELS="qk_norm_rope_forward qk_norm_rope_backward" CONFIG=512/1024/128 bash bench/gpu_ncu_kernels.sh
# Run after the CUDA build (bench/gpu_session.sh builds it).
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:-$PWD/out}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
for k in ${KERNELS:?}; do
  timeout 240 "$NCU" -k "regex:$k" --launch-count "${LAUNCHES:-2}" --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
    build-gpu/fluxtrain bench --device cuda --configs "${CONFIG:-512/1024/128}" --cuda_graph off --warmup 0 \
    --iters 1 --gradient_checkpointing off > "$OUT/ncu_$k.txt" 2>&1
  echo "== $k (rc $?)"
  grep -E "^  [a-z_:]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Block Size|Grid Size|L1/TEX Hit|L2 Hit|Mem Busy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|stall" "$OUT/ncu_$k.txt" | head -60
done
