#!/usr/bin/env bash
# Distributed training on one node (or several, with HOSTFILE): one MPI rank per GPU, every
# argument passed through unchanged to `fluxtrain train`.
#
#   launch/mpirun.sh --config configs/x.ini --output_dir runs/x [...]      # all GPUs of this node
#   NP=4 launch/mpirun.sh ...                                               # first 4 GPUs
#   HOSTFILE=hosts GPUS_PER_NODE=8 launch/mpirun.sh ...                     # several nodes
#
# Rank -> GPU: ranks are placed node by node (--map-by ppr:GPUS_PER_NODE:node), so local rank
# L of a node drives GPU L of that node (fluxtrain selects cuda:<local rank> itself; every GPU
# stays visible to every rank so that NCCL sees the whole NVLink topology). Each rank is bound
# to CORES_PER_RANK cores of its own, for data loading threads and the host side of the step.
set -euo pipefail

# ---- settings (environment overrides) --------------------------------------------------------
FLUXTRAIN=${FLUXTRAIN:-$(cd "$(dirname "$0")/.." && pwd)/build/fluxtrain}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
HOSTFILE=${HOSTFILE:-}                       # empty: this node only
NP=${NP:-}                                   # default: GPUS_PER_NODE x nodes in HOSTFILE
CORES_PER_RANK=${CORES_PER_RANK:-}           # default: cores of the node / GPUS_PER_NODE
MPIRUN=${MPIRUN:-mpirun}
EXTRA_MPI_ARGS=${EXTRA_MPI_ARGS:-}           # e.g. "--mca btl_tcp_if_include eth0"
# ----------------------------------------------------------------------------------------------

if [[ ! -x "$FLUXTRAIN" ]]; then echo "mpirun.sh: $FLUXTRAIN not found (build first, or set FLUXTRAIN)" >&2; exit 2; fi
if [[ -z "$GPUS_PER_NODE" || "$GPUS_PER_NODE" -lt 1 ]]; then
  echo "mpirun.sh: no GPU found by nvidia-smi; set GPUS_PER_NODE (or use launch/single_gpu.sh)" >&2; exit 2
fi
nodes=1
if [[ -n "$HOSTFILE" ]]; then nodes=$(grep -cvE '^\s*(#|$)' "$HOSTFILE"); fi
NP=${NP:-$(( GPUS_PER_NODE * nodes ))}
ppn=$(( NP < GPUS_PER_NODE ? NP : GPUS_PER_NODE ))
CORES_PER_RANK=${CORES_PER_RANK:-$(( $(nproc --all) / ppn ))}
(( CORES_PER_RANK >= 1 )) || CORES_PER_RANK=1

args=(-np "$NP" --map-by "ppr:${ppn}:node:PE=${CORES_PER_RANK}" --bind-to core --report-bindings)
[[ -n "$HOSTFILE" ]] && args+=(--hostfile "$HOSTFILE")
[[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)

# NCCL: NVLink SHARP (NVLS) stays off (multicast objects are not available on every machine
# and fail late); errors are reported once per rank; the rest is NCCL's topology detection.
export NCCL_NVLS_ENABLE=0
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CORES_PER_RANK}
env_args=()
for v in NCCL_NVLS_ENABLE NCCL_DEBUG OMP_NUM_THREADS LD_LIBRARY_PATH PATH; do
  [[ -n "${!v:-}" ]] && env_args+=(-x "$v")
done
# Pass any other NCCL_*/FLUXTRAIN_* variables the user set (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...).
while IFS='=' read -r name _; do
  [[ "$name" == NCCL_NVLS_ENABLE || "$name" == NCCL_DEBUG ]] && continue
  env_args+=(-x "$name")
done < <(env | grep -E '^(NCCL_|FLUXTRAIN_|CUDA_)' || true)

set -x
# shellcheck disable=SC2086
exec "$MPIRUN" "${args[@]}" "${env_args[@]}" $EXTRA_MPI_ARGS "$FLUXTRAIN" train "$@"
