#!/usr/bin/env bash
# Runs every test: sets up and builds (launch/setup.sh), then ctest with all labels:
# unit (GoogleTest), mpi (mpirun --oversubscribe with 2 and 4 ranks), py (diffusers parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
cd "${FLUXTRAIN_BUILD:-build}"
ctest -j"${JOBS:-$(nproc)}" --output-on-failure --timeout 1200
# Fuzzing: libFuzzer targets (clang, ASan + UBSan), ~60 s of runs (FLUXTRAIN_FUZZ_CI=0 skips).
cd - > /dev/null
[ "${FLUXTRAIN_FUZZ_CI:-1}" = 0 ] || bash tests/fuzz/ci.sh
