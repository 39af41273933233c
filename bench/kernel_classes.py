#!/usr/bin/env python3
"""Sums the GPU kernels of a Chrome trace written by `fluxtrain bench --profile PATH` (one eager
step under LibTorch's profiler) by kernel class, and prints one JSON line per trace: kernel count,
summed kernel time, the GPU span of the step, and per class its time, share and count, plus the
most expensive kernels. The classes follow issue 15's list: GEMMs, attention, norms, RoPE,
GELU/activations, other elementwise (modulation, gates, residuals), copies/concatenation, fp8
dequantisation, reductions, the optimizer, host<->device memcpy/memset.

  python3 bench/kernel_classes.py out/profile_*.json
"""
import json
import re
import sys

# (class, pattern on the lower-cased kernel name); the first match wins, so the specific classes
# (attention kernels contain "gemm"-like words, copies are elementwise kernels) come first.
CLASSES = [
    ("attention", r"flash|fmha|sdpa|attention|cudnn_generated"),
    ("fp8_dequant", r"fp8|e4m3|dequant"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|splitk"),
    ("norm", r"layer_norm|layernorm|rms_norm|rmsnorm|rowwisemoments|welford|modulated"),
    ("rope", r"rope"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("copy_cat", r"copy|catarray|cat_|transpose|permute|index"),
    ("activation", r"gelu|silu|tanh"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|fill"),
]


def classify(name):
    n = name.lower()
    for cls, pat in CLASSES:
        if re.search(pat, n):
            return cls
    return "other"


def summarize(path):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    launches = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
                and "launch" in e.get("name", "").lower()]
    classes, by_name = {}, {}
    total = 0.0
    for e in kernels:
        cls = e["cat"] if e["cat"] != "kernel" else classify(e["name"])
        dur = float(e.get("dur", 0)) / 1000.0
        total += dur
        c = classes.setdefault(cls, {"ms": 0.0, "count": 0})
        c["ms"] += dur
        c["count"] += 1
        short = re.sub(r"\(.*", "", e["name"].replace("(anonymous namespace)::", ""))[:120]
        b = by_name.setdefault(short, {"ms": 0.0, "count": 0, "class": cls})
        b["ms"] += dur
        b["count"] += 1
    span = 0.0
    if kernels:
        span = (max(e["ts"] + e.get("dur", 0) for e in kernels) - min(e["ts"] for e in kernels)) / 1000.0
    for c in classes.values():
        c["share"] = c["ms"] / total if total else 0.0
        c["ms"] = round(c["ms"], 3)
        c["share"] = round(c["share"], 4)
    top = sorted(by_name.items(), key=lambda kv: -kv[1]["ms"])[:15]
    return {
        "trace": path,
        "kernels": sum(1 for e in kernels if e["cat"] == "kernel"),
        "kernel_launches": len(launches),
        "cpu_ops": len(cpu_ops),
        "kernel_ms": round(total, 3),
        "gpu_span_ms": round(span, 3),
        "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1]["ms"])),
        "top": [{"name": n, "class": v["class"], "ms": round(v["ms"], 3), "count": v["count"]} for n, v in top],
    }


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for p in argv[1:]:
        try:
            print(json.dumps(summarize(p)))
        except (OSError, ValueError, KeyError) as e:
            print(f"kernel_classes: {p}: not a readable Chrome trace ({e})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
