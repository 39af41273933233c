#!/usr/bin/env bash
# Training on one GPU without mpirun: every argument passed through to `fluxtrain train`.
#   launch/single_gpu.sh --config configs/x.ini --output_dir runs/x
#   GPU=3 launch/single_gpu.sh ...          # pick the GPU
# fluxtrain starts as a single-rank job (MPI singleton: no launcher, no NCCL communicator).
set -euo pipefail

# ---- settings (environment overrides) --------------------------------------------------------
FLUXTRAIN=${FLUXTRAIN:-$(cd "$(dirname "$0")/.." && pwd)/build/fluxtrain}
GPU=${GPU:-0}
# ----------------------------------------------------------------------------------------------

if [[ ! -x "$FLUXTRAIN" ]]; then echo "single_gpu.sh: $FLUXTRAIN not found (build first, or set FLUXTRAIN)" >&2; exit 2; fi
export CUDA_VISIBLE_DEVICES=$GPU
export NCCL_NVLS_ENABLE=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
exec "$FLUXTRAIN" train "$@"
