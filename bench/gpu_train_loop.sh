#!/usr/bin/env bash
# `fluxtrain train` at graph speed (issue 15): seconds per update of the real training loop on
# synthetic data at FLUX.1-dev size, beside `fluxtrain bench`'s step at the same sizes.
# Runs after the GPU build (build-gpu, bench/gpu_build_and_bench.sh or bench/gpu_session.sh).
# Random bf16 weights (init-model flux-dev), 512 T5 tokens, batch 1, one condition, no
# checkpointing, --validation_steps 0. CONFIGS="cond/noise/rank ...", STEPS, EAGER_CONFIGS
# (configs also run with --cuda_graph off). Prints one JSON line per run; writes $OUT/train_loop.jsonl.
set -euo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
B=build-gpu/fluxtrain
CONFIGS=${CONFIGS:-"192/384/16 256/512/32 384/768/64 512/1024/128"}
EAGER_CONFIGS=${EAGER_CONFIGS:-"192/384/16"}
STEPS=${STEPS:-30}
t0=$(date +%s)
[ -f /tmp/flux-dev/flux1-dev.safetensors ] || $B init-model --size flux-dev --dtype bf16 --layout bfl --output_dir /tmp/flux-dev > /dev/null
echo "model: $(( $(date +%s) - t0 )) s"
: > "$OUT/train_loop.jsonl"
run_one() {  # cond noise rank graph
  local c=$1 n=$2 r=$3 g=$4 data=/tmp/flux-data-$1-$2.h5 dir=/tmp/run-$1-$2-$3-$4
  [ -f "$data" ] || $B synth-data --output "$data" --size flux-dev --num_samples 64 --sizes $((n / 8)) \
    --cond_latent_size $((c / 8)) --text_len 512 > /dev/null
  rm -rf "$dir"
  $B train --pretrained_model_name_or_path /tmp/flux-dev --train_data "$data" --output_dir "$dir" --device cuda \
    --mixed_precision bf16 --ranks "$r" --network_alphas "$r" --cond_size "$c" --noise_size "$n" \
    --train_batch_size 1 --gradient_accumulation_steps 1 --max_train_steps "$STEPS" --validation_steps 0 \
    --checkpointing_steps 100000 --report_to none --seed 1 --cuda_graph "$g" > "$OUT/train-$c-$n-$r-$g.log" 2>&1 \
    || { echo "train $c/$n/$r graph=$g FAILED"; tail -5 "$OUT/train-$c-$n-$r-$g.log"; return 0; }
  python3 - "$dir/metrics.jsonl" "$c/$n/$r" "$g" "$(grep -o 'step: [^,]*' "$OUT/train-$c-$n-$r-$g.log" | head -1)" <<'PY' | tee -a "$OUT/train_loop.jsonl"
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])]
s = [x["s_per_step"] for x in m[5:]]  # after warm-up and capture
print(json.dumps({"name": "train_loop", "config": sys.argv[2], "cuda_graph": sys.argv[3], "mode": sys.argv[4],
                  "s_per_update_median": statistics.median(s), "updates_timed": len(s),
                  "data_wait_ms_median": statistics.median(x["data_wait_ms"] for x in m[5:]),
                  "peak_gpu_gib": max(x.get("peak_gpu_gib", 0) for x in m),
                  "peak_host_rss_gib": max(x.get("peak_host_rss_gib", 0) for x in m)}))
PY
}
for cfg in $CONFIGS; do
  IFS=/ read -r c n r <<< "$cfg"
  run_one "$c" "$n" "$r" on
  for e in $EAGER_CONFIGS; do [ "$e" = "$cfg" ] && run_one "$c" "$n" "$r" off; done
done
# The bench's graph step at the same sizes, for the comparison.
$B bench --device cuda --configs "$(echo $CONFIGS | tr ' ' ',')" --gradient_checkpointing off --cuda_graph on \
  --warmup 3 --iters 9 | tee "$OUT/bench_graph.jsonl"
python3 - "$OUT/train_loop.jsonl" "$OUT/bench_graph.jsonl" <<'PY'
import json, sys
bench = {}
for l in open(sys.argv[2]):
    j = json.loads(l)
    if "ms_per_step" in j:
        c = j["config"]; bench[f'{c["cond_size"]}/{c["noise_size"]}/{c["rank"]}'] = j["ms_per_step"]
print("config          graph  train ms/update  bench graph ms  ratio")
for l in open(sys.argv[1]):
    j = json.loads(l)
    b = bench.get(j["config"])
    t = 1000 * j["s_per_update_median"]
    print(f'{j["config"]:15} {j["cuda_graph"]:5}  {t:15.1f}  {b if b else float("nan"):14.1f}  {t / b if b else float("nan"):.3f}')
PY
