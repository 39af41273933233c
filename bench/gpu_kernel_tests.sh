#!/usr/bin/env bash
# The start of a device call that checks kernels: the CUDA build with the tests (bench/gpu_session.sh,
# running the PARTS it names, e.g. graph_test), then the fused-kernel GPU tests, whose summary it
# prints. Sourced by bench/gpu_fused_check.sh, gpu_step_check.sh and gpu_session8_b.sh.
# Its own environment too: the test binary runs in this shell and needs the carried libraries
# (session 11 lost a test run to a caller that had not sourced it).
source bench/gpu_env.sh
BUILD_TESTS=1 PARTS="${PARTS:- }" bash bench/gpu_session.sh || exit 1
rm -f "$OUT/build.log" "$OUT/cmake.log"
timeout 120 build-gpu/tests/fluxtrain_tests --gtest_filter='Fused*:Kernels*:AttentionPolicy*:Recompute*:Fp8*:MatmulDgelu*:GeluLinear*' > "$OUT/fused_tests.log" 2>&1
echo "fused tests rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/fused_tests.log" | tr '\n' ' ')"
grep -E "FAILED|Failure" -A4 "$OUT/fused_tests.log" | head -30
