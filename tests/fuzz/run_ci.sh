#!/bin/bash
# Short fuzzing run for CI: every target for a few seconds from its seed corpus (about 60 s in
# all), with ASan + UBSan. Fails on the first crash, leak, sanitizer report or timeout; the input
# that caused it is left in $ARTIFACTS (default build-fuzz/artifacts) to reproduce with
# `build-fuzz/tests/fuzz/fuzz_<target> <file>`.
# Usage: tests/fuzz/run_ci.sh [build dir] [seconds per target]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-build-fuzz}
secs=${2:-8}
artifacts=${ARTIFACTS:-$build/artifacts}
mkdir -p "$artifacts"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=1
# The targets hand each input to the readers as a file: on a RAM-backed TMPDIR that write is
# ~4x cheaper than on disk (0.9 vs 3.8 ms per safetensors input measured on the 2-core CI machine).
if [[ -z ${TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then export TMPDIR=/dev/shm; fi
for t in safetensors config checkpoint dataset jsonl tokenizers image; do
  bin=$build/tests/fuzz/fuzz_$t
  if [[ $t == image && ! -x $bin ]] && ! grep -q fuzz_image "$build/build.ninja"; then
    echo "== fuzz_image: skipped (built without libvips)"; continue
  fi
  [[ -x $bin ]] || { echo "missing $bin (ninja -C $build fuzz_$t)" >&2; exit 2; }
  corpus=$(mktemp -d)  # new inputs go here; the seed corpus in the tree stays as it is
  echo "== fuzz_$t: $secs s"
  # The fuzzer's own exit status: with pipefail a failing fuzzer fails the pipeline, so it is
  # read from PIPESTATUS right away (an `|| true` would run and reset it, which let findings pass).
  set +e
  "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -max_len=262144 -print_final_stats=1 \
         -artifact_prefix="$artifacts/fuzz_$t-" "$corpus" "$here/corpus/$t" 2>&1 |
    grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss|==[0-9]+==ERROR|SUMMARY|.*Test unit written)"
  status=${PIPESTATUS[0]}
  set -e
  rm -rf "$corpus"
  if [[ $status -ne 0 ]]; then
    # A finding. Crafted HDF5 files reach known bugs inside libhdf5 1.10 itself (README,
    # "Inside libhdf5"); those, and a timeout that does not reproduce on its own (a loaded
    # machine), are reported and do not fail CI. Anything in fluxtrain's code does.
    lines=$(FLUXTRAIN_FUZZ_RESTAMP=0 bash "$here/triage.sh" "$build" "$artifacts" | grep "^fuzz_$t-" || true)
    echo "$lines"
    if [[ -z $lines ]] || grep -v -E -- "-- (libhdf5|no longer reproduces)" <<<"$lines" | grep -q .; then
      echo "fuzz_$t FAILED (exit $status); reproducer in $artifacts" >&2
      exit 1
    fi
    echo "fuzz_$t: only known libhdf5 findings or non-reproducing timeouts (above); not counted"
  fi
done
echo "fuzzing: no findings"
