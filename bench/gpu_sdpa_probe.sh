#!/usr/bin/env bash
# One device call's part on attention (issue 15): builds bench/probe_cudnn_sdpa.cu against the
# installed LibTorch, its cuDNN and cuDNN's frontend headers (PyPI nvidia-cudnn-frontend, 3 MB of
# headers carried in .deps/cudnn_frontend/include; fetch them with
#   pip download --no-deps -d /tmp/fe nvidia-cudnn-frontend && unzip -q /tmp/fe/*.whl 'include/*' -d .deps/cudnn_frontend
# and run with carry [".deps"]), runs it, keeps the JSON lines in $OUT/cudnn_sdpa.jsonl and prints
# a summary. Session 18's results: docs/benchmarks.md.
# SKIP_PROBE / SKIP_STEP leave a part out (the step part needs build-gpu); PROBE_SKIP_SHAPES=1 runs
# only the sustained loops; STEP_RUNS picks steps among "ec512 plain1024 fp8_512" (the bench's own
# NVML summary, `gpu_power` in its JSON, is printed beside nvidia-smi's). Usage: bash bench/gpu_sdpa_probe.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
SITE=$(dirname "$TORCH")
CUDNN=$SITE/nvidia/cudnn
CUDART=$(ls -d $SITE/nvidia/cu1*/lib 2>/dev/null | head -1)
CUDAINC=$(ls -d $SITE/nvidia/cu1*/include 2>/dev/null | head -1)
FE=${FE_INCLUDE:-.deps/cudnn_frontend/include}
# The GPU's clocks, power and throttle reasons every 100 ms while the probe runs (and while the
# step runs, below): kernels timed in short bursts against the same kernels under sustained load.
sample() { nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown,clocks_event_reasons.sw_thermal_slowdown --format=csv,noheader -lms 100 > "$1" 2>&1 & echo $!; }
summarise() { python3 - "$1" <<'PY'
import sys
rows = [l.strip().split(", ") for l in open(sys.argv[1]) if l.count(",") >= 8]
def num(x):
    try: return float(x.split()[0])
    except ValueError: return None
busy = [r for r in rows if num(r[3]) and num(r[3]) > 250]
if not busy: print("  no busy samples"); sys.exit()
sm = sorted(num(r[1]) for r in busy); pw = sorted(num(r[3]) for r in busy)
cap = sum(r[6] == "Active" for r in busy); hw = sum(r[7] == "Active" for r in busy); th = sum(r[8] == "Active" for r in busy)
print(f"  {len(busy)} busy samples (>250 W): SM clock median {sm[len(sm)//2]:.0f} MHz (min {sm[0]:.0f}, max {sm[-1]:.0f}), "
      f"power median {pw[len(pw)//2]:.0f} W (max {pw[-1]:.0f}, limit {busy[0][4]}), temp {busy[-1][5]} C; "
      f"power cap active {cap}, hw slowdown {hw}, thermal {th}")
PY
}
if [ -z "${SKIP_PROBE:-}" ]; then
t0=$(date +%s)
g++ -O2 -std=c++17 -w -x c++ bench/probe_cudnn_sdpa.cu -x none -o /tmp/probe_cudnn_sdpa \
  -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" -I"$CUDNN/include" -I"$FE" \
  ${CUDAINC:+-I$CUDAINC} -I/usr/local/cuda/include \
  -L"$TORCH/lib" -ltorch -ltorch_cpu -ltorch_cuda -lc10 -lc10_cuda \
  -L"$CUDNN/lib" -l:libcudnn.so.9 ${CUDART:+-L$CUDART} -l:libcudart.so.13 -l:libnvrtc.so.13 -ldl \
  -Wl,-rpath,"$TORCH/lib:$CUDNN/lib${CUDART:+:$CUDART}" 2>&1 | tail -20
echo "probe build: $(( $(date +%s) - t0 )) s"
S=$(sample "$OUT/clocks_probe.csv")
PROBE_SUSTAIN_S=${PROBE_SUSTAIN_S:-10} timeout ${PROBE_TIMEOUT:-300} /tmp/probe_cudnn_sdpa > "$OUT/cudnn_sdpa.jsonl" 2> "$OUT/cudnn_sdpa.err"
echo "probe exit $?"; tail -5 "$OUT/cudnn_sdpa.err"; kill $S
echo "clocks during the probe:"; summarise "$OUT/clocks_probe.csv"
python3 - "$OUT/cudnn_sdpa.jsonl" <<'PY'
import json, sys
best = {}
for l in open(sys.argv[1]):
    try: d = json.loads(l)
    except ValueError: continue
    p = d.get("probe", "")
    if "ms" in d and "plan" in d:
        if p not in best or d["ms"] < best[p]["ms"]: best[p] = d
    elif "plan" not in d:
        print(l.strip()[:240])
for p, d in best.items():
    print(f'{p:40s} best plan {d["plan"]}/{d["plans"]}: {d["ms"]:.3f} ms, {d["tflops"]} TFLOP/s')
PY
fi
# The graph step under the same sampling (needs build-gpu: run after a build).
B=build-gpu/fluxtrain
if [ -z "${SKIP_STEP:-}" ] && [ -x $B ]; then
  G="bench --device cuda --cuda_graph on --warmup 3 --iters ${STEP_ITERS:-30} --gradient_checkpointing off"
  run_sampled() {  # name, bench args...
    local name=$1; shift
    S=$(sample "$OUT/clocks_$name.csv")
    timeout 200 $B $G "$@" > "$OUT/step_$name.jsonl"
    kill $S
    python3 - "$OUT/step_$name.jsonl" "$name" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    p = d.get("gpu_power") or {}
    nv = ("%d samples, SM %.0f MHz (min %.0f), %.0f W, capped %.2f" % (p["samples"], p["sm_mhz_median"], p["sm_mhz_min"],
          p["power_w_median"], p["power_capped_fraction"])) if p else "none"
    print(sys.argv[2], round(d["ms_per_step"], 1), "ms,", round(d["model_tflops"]), "TFLOP/s; bench's NVML samples:", nv)
PY
    summarise "$OUT/clocks_$name.csv"
  }
  for r in ${STEP_RUNS:-ec512 plain1024 fp8_512}; do
    case $r in
      ec512) run_sampled ec512 --configs 512/1024/128 ;;
      plain1024) run_sampled plain1024 --lora_mode standard --configs 0/1024/128 ;;
      fp8_512) run_sampled fp8_512 --configs 512/1024/128 --base_precision fp8 --fp8_matmul --fp8_keep_transposed ;;
    esac
  done
fi
