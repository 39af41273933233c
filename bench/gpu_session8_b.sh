#!/usr/bin/env bash
# Session 8, device call B: the CUDA build with the tests; the fused-kernel GPU tests (the new
# D=128 vector path of QK RMSNorm + RoPE); eager vs CUDA-graph `train` bit-identity; the bench's
# graph step at the four configurations; the kernel profile at the two large ones with the
# copy/elementwise/memset kernels traced back to their host ops.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source bench/gpu_env.sh
PARTS=graph_test source bench/gpu_kernel_tests.sh
B=build-gpu/fluxtrain
G="bench --device cuda --gradient_checkpointing off --cuda_graph on --warmup 3 --iters 7"
timeout 200 $B $G --configs 192/384/16,256/512/32,384/768/64,512/1024/128 > "$OUT/graph.jsonl"
python3 - "$OUT/graph.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l); c = d["config"]
    print("graph", c["cond_size"], c["noise_size"], c["rank"], round(d["ms_per_step"], 1), round(d["model_tflops"]))
PY
CONFIGS=384/768/64,512/1024/128 TAG=vec ATTR=copy_cat,elementwise,gpu_memset,other timeout 150 bash bench/gpu_profile_kernels.sh > /dev/null 2>&1
python3 - "$OUT/kernel_classes.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    print(d["trace"], d["kernels"], round(d["kernel_ms"], 1), {k: (round(v["ms"], 1), v["count"]) for k, v in d["classes"].items()})
    for t in d["top"][:8]: print("   ", t["class"], t["ms"], t["count"], t["name"][:80])
    for a in d.get("attribution", [])[:25]: print("   @", a["class"], a["count"], a["ms"], a["outer"][:70], "|", a["inner"])
PY
(cd "$OUT" && rmdir traces 2>/dev/null; ls)
