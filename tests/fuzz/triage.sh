#!/bin/bash
# Sorts the findings of tests/fuzz/run_long.sh: re-runs every artifact (fuzz_<target>-crash-*,
# -oom-*, -timeout-*) once with full ASan reports and prints one line per artifact: the kind, the
# sanitizer's summary, and where it happened. "libhdf5" means the first frame of the report that
# is not the sanitizer's own is inside libhdf5 (a crafted file crashing HDF5 1.10 itself, see
# README); "fluxtrain" means our code: fix it. Full reports are left next to the artifacts (.txt);
# an artifact with a report already is not run again.
# Usage: tests/fuzz/triage.sh [build dir] [artifacts dir]
set -uo pipefail
build=${1:-build-fuzz}
arts=${2:-$build/fuzz-work/artifacts}
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# Re-stamped checkpoints as run_long.sh fuzzes them, unless the caller says otherwise (run_ci.sh: 0).
export OMP_NUM_THREADS=1 FLUXTRAIN_FUZZ_RESTAMP=${FLUXTRAIN_FUZZ_RESTAMP:-1} VIPS_CONCURRENCY=1
if [[ -z ${TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then export TMPDIR=/dev/shm; fi
for a in "$arts"/fuzz_*-{crash,oom,timeout,leak}-*; do
  [[ -f $a && $a != *.txt ]] || continue
  name=$(basename "$a"); t=${name%%-*}
  report=$a.txt
  if [[ -f $report ]]; then  # triaged before: the exit status is the report's last line
    rc=$(tail -1 "$report" | sed -n 's/^exit //p'); rc=${rc:-1}
  else
    timeout 60 "$build/tests/fuzz/$t" -timeout=10 -rss_limit_mb=4096 "$a" >"$report" 2>&1
    rc=$?
    echo "exit $rc" >>"$report"
  fi
  summary=$(grep -m1 -E '^SUMMARY|ERROR: libFuzzer' "$report" | sed -E 's/ \((\/|BuildId)[^)]*\)//g' | cut -c1-110)
  # First frame outside the sanitizer/libFuzzer runtime and libc's mem* interceptors.
  frame=$(grep -E '^ +#[0-9]+ 0x' "$report" | grep -v -E 'in (__interceptor_|__asan|__sanitizer|fuzzer::|malloc|calloc|realloc|operator new|__libc|_start|main)\b|libc\.so|sysdeps/|/fuzz_[a-z]+\+0x' | head -1)
  if [[ $rc -eq 0 ]]; then where="no longer reproduces"
  elif grep -q libhdf5 <<<"$frame"; then where="libhdf5 ($(grep -o -m1 'in H5[A-Za-z0-9_]*' "$report" | head -1 | cut -c4-))"
  elif grep -q -E 'libvips|libMagick|libjpeg|libpng|libtiff|libwebp|libgif' <<<"$frame"; then where="image library ($(sed -E 's/.*\((.*)\+0x.*/\1/' <<<"$frame"))"
  else where="fluxtrain: $(sed -E 's/^ +#[0-9]+ 0x[0-9a-f]+ in //' <<<"$frame" | cut -c1-120)"
  fi
  echo "$name: exit $rc, ${summary:-?} -- $where"
done
