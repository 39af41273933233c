#!/usr/bin/env bash
# Session 8, device call A (measurements only, no new code): the CUDA build; the post-fusion kernel
# profile at the two large configurations (issue 15: where the time goes now); the bench's
# checkpointed graph step at the four configurations (target 1.3x the plain step's); the training
# loop against the bench after fusion, whose metrics also give the resident bf16 `train` run's peak
# host RSS from a BFL snapshot (issue 14 point 6).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
PARTS=" " bash bench/gpu_session.sh || exit 1
rm -f "$OUT/build.log" "$OUT/cmake.log"
B=build-gpu/fluxtrain
t0=$(date +%s)
CONFIGS=384/768/64,512/1024/128 TAG=fused timeout 150 bash bench/gpu_profile_kernels.sh > /dev/null 2>&1
python3 - "$OUT/kernel_classes.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    print(d["trace"], d["kernels"], d["kernel_launches"], round(d["kernel_ms"], 1),
          {k: round(v["ms"], 1) for k, v in d["classes"].items()})
    for t in d["top"][:12]: print("   ", t["class"], t["ms"], t["count"], t["name"][:90])
PY
echo "profile: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
timeout 200 $B bench --device cuda --gradient_checkpointing on --cuda_graph on --warmup 2 --iters 5 \
  --configs 192/384/16,256/512/32,384/768/64,512/1024/128 | tee "$OUT/graph_ckpt.jsonl" | cut -c1-330
echo "ckpt: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
STEPS=25 EAGER_CONFIGS=none timeout 330 bash bench/gpu_train_loop.sh 2>&1 | tail -8
echo "train_loop: $(( $(date +%s) - t0 )) s"
# At most 8 files come back: keep the JSON lines, bundle the logs.
(cd "$OUT" && tar czf logs.tgz train-*.log 2>/dev/null && rm -f train-*.log; rmdir traces 2>/dev/null; ls)
