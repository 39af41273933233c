#!/bin/bash
# Long fuzzing runs: each target until it has executed RUNS inputs (default 10 million), on
# JOBS parallel workers, keeping the grown corpus in $WORK/<target> so that a later run goes on
# from there. Findings (crash-*, leak-*, timeout-*) land in $WORK/artifacts.
# Usage: tests/fuzz/run_long.sh [build dir] [targets...]  (env RUNS, JOBS, WORK, MAX_TIME, MAX_LEN)
#   MAX_TIME: seconds each worker may run at most (libFuzzer -max_total_time; default: no bound),
#             so that a run on a slow target ends by a deadline whatever its count.
#   FORK=1:   libFuzzer's fork mode (-fork=JOBS) going on past crashes, out-of-memory and
#             timeouts (every one is still written to $WORK/artifacts). For fuzz_dataset and
#             fuzz_checkpoint (re-stamped): crafted HDF5 files crash libhdf5 1.10 itself within
#             seconds to minutes (README), which would otherwise end the run at the first one.
#             Triage the artifacts afterwards: tests/fuzz/triage.sh.
# Run it under `nice -n 19` on a shared machine. One line per target (executions, wall time,
# exec/s, workers, coverage, findings) is appended to $WORK/summary.txt; the workers' logs
# stay in $WORK/logs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:-build-fuzz}" && pwd)
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(safetensors config checkpoint dataset jsonl tokenizers)
[[ ${#targets[@]} -gt 0 && -x $build/tests/fuzz/fuzz_image && $# -eq 0 ]] && targets+=(image)
runs=${RUNS:-10000000}
jobs=${JOBS:-$(nproc)}
work=${WORK:-$build/fuzz-work}
mkdir -p "$work/artifacts" "$work/logs"
work=$(cd "$work" && pwd)
# malloc_context_size=0: no stack trace recorded at every malloc and free (20-25 % of the time
# of the allocation-heavy targets); detection is the same, only a report lacks the "allocated
# by / freed by" stacks: re-run the artifact with the default options to see them (README).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:malloc_context_size=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=1
# libvips (fuzz_image, fuzz_jsonl): one thread, no operation cache (the targets also set this).
export VIPS_CONCURRENCY=1
# The targets hand each input to the readers as a file: on a RAM-backed TMPDIR that write is
# ~4x cheaper than on disk (0.9 vs 3.8 ms per safetensors input measured on the 2-core CI machine).
if [[ -z ${TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then export TMPDIR=/dev/shm; fi
export FLUXTRAIN_FUZZ_RESTAMP=${FLUXTRAIN_FUZZ_RESTAMP:-1}  # checkpoint target: also fuzz HDF5's parser
time_opt=()
[[ -n ${MAX_TIME:-} ]] && time_opt=(-max_total_time="$MAX_TIME")
cd "$work"  # libFuzzer writes the workers' logs (fuzz-<n>.log) to the current folder
# Largest input per target: above what any code path of the format needs (seed files: at most
# 44 KB), so nothing is out of reach, but no longer spending time on megabyte inputs, which
# libFuzzer otherwise grows towards (the tokenizers' BPE is quadratic in a word's length).
max_len_of() {
  case $1 in
    config|jsonl) echo 16384 ;;
    tokenizers) echo 4096 ;;
    dataset) echo 131072 ;;
    *) echo 65536 ;;  # safetensors, checkpoint, image
  esac
}
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  per_job=$(( (runs + jobs - 1) / jobs ))
  echo "== fuzz_$t: $runs executions on $jobs workers (corpus $work/$t)"
  rm -f fuzz-*.log
  start=$(date +%s)
  # -runs applies per worker: jobs x per_job >= runs executions in all (fork mode: in all).
  if [[ ${FORK:-0} == 1 ]]; then
    mode=(-fork="$jobs" -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 -runs="$runs")
  else
    mode=(-runs="$per_job" -jobs="$jobs" -workers="$jobs")
  fi
  "$build/tests/fuzz/fuzz_$t" "${mode[@]}" -timeout=10 -rss_limit_mb=4096 \
      -max_len="${MAX_LEN:-$(max_len_of "$t")}" -print_final_stats=1 "${time_opt[@]}" -artifact_prefix="$work/artifacts/fuzz_$t-" \
      "$work/$t" "$here/corpus/$t" >"$work/fuzz_$t.log" 2>&1 || true
  wall=$(( $(date +%s) - start ))
  if [[ ${FORK:-0} == 1 ]]; then  # the parent's status lines: "#<executions>: cov: <n> ..."
    execs=$(grep -o '^#[0-9]*: cov: [0-9]*' "$work/fuzz_$t.log" | tail -1 | awk '{print substr($1, 2) + 0}')
    cov=$(grep -o '^#[0-9]*: cov: [0-9]*' "$work/fuzz_$t.log" | tail -1 | awk '{print $3 + 0}')
    execs=${execs:-0} cov="${cov:-0} (fork-mode count)"
  else
    execs=$(cat fuzz-*.log 2>/dev/null | awk '/stat::number_of_executed_units/ {s+=$2} END {print s+0}')
    cov=$(cat fuzz-*.log 2>/dev/null | grep -o 'cov: [0-9]*' | awk '{if ($2>m) m=$2} END {print m+0}')
  fi
  found=$(ls "$work/artifacts" | grep -c -E "^fuzz_$t-(crash|oom|timeout|leak|slow-unit)-[0-9a-f]+$" || true)
  line="$(date -u +%F) fuzz_$t: $execs executions, ${wall} s wall, $(( execs / (wall > 0 ? wall : 1) )) exec/s on $jobs workers$([[ ${FORK:-0} == 1 ]] && echo " (fork mode)"), cov $cov, corpus $(ls "$work/$t" | wc -l), findings $found"
  echo "$line" | tee -a "$work/summary.txt"
  for f in fuzz-*.log; do [[ -e $f ]] && mv "$f" "$work/logs/fuzz_$t-${f#fuzz-}"; done
done
ls "$work/artifacts"
n=$(ls "$work/artifacts" | grep -c -E -- "-(crash|oom|timeout|leak|slow-unit)-[0-9a-f]+$" || true)
echo "findings: $n"
[[ $n -eq 0 ]]
