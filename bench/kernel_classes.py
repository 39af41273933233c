#!/usr/bin/env python3
"""Sums the GPU kernels of a Chrome trace written by `fluxtrain bench --profile PATH` (one eager
step under LibTorch's profiler) by kernel class, and prints one JSON line per trace: kernel count,
summed kernel time, the GPU span of the step, and per class its time, share and count, plus the
most expensive kernels. The classes follow issue 15's list: GEMMs, attention, norms, RoPE,
GELU/activations, other elementwise (modulation, gates, residuals), copies/concatenation, fp8
GEMM operands (rowwise quantisation, transposed codes), fp8 dequantisation, reductions, the optimizer, host<->device memcpy/memset.

  python3 bench/kernel_classes.py [--attribute copy_cat,elementwise,gpu_memset] out/profile_*.json

--attribute CLASSES adds, for the kernels of those classes, where they come from: the outermost
and innermost host op around each kernel's launch (an autograd node's name in backward, e.g.
"autograd::engine::evaluate_function: CatBackward0"), with count and ms per pair, so that the
ops worth fusing or removing can be read off the trace.
"""
import json
import re
import sys

# (class, pattern on the lower-cased kernel name); the first match wins, so the specific classes
# (attention kernels contain "gemm"-like words, copies are elementwise kernels) come first.
CLASSES = [
    ("attention", r"flash|fmha|sdpa|attention|cudnn_generated"),
    ("fp8_operands", r"quantise_rows|transpose_codes"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|splitk"),  # fp8 GEMMs too (their names hold e4m3)
    ("fp8_dequant", r"fp8|e4m3|dequant"),
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


def attribute(events, kernels, wanted, top=25):
    """(outer op, inner op) around the launch of each kernel whose class is in `wanted`."""
    launch_by_corr = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            launch_by_corr[e["args"]["correlation"]] = e
    want = {}  # launch correlation -> (class, kernel ms)
    for e in kernels:
        cls = e["cat"] if e["cat"] != "kernel" else classify(e["name"])
        corr = e.get("args", {}).get("correlation")
        if cls in wanted and corr in launch_by_corr:
            want[corr] = (cls, float(e.get("dur", 0)) / 1000.0)
    # Host ops nest on their thread: sweep ops and launches in time order with a stack of open ops.
    timeline = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            timeline.append((e["ts"], 0, e))
    for corr, _ in want.items():
        e = launch_by_corr[corr]
        timeline.append((e["ts"], 1, e))
    timeline.sort(key=lambda x: (x[0], x[1]))
    stacks, agg = {}, {}
    for ts, kind, e in timeline:
        st = stacks.setdefault(e.get("tid"), [])
        while st and st[-1]["ts"] + st[-1].get("dur", 0) < ts:
            st.pop()
        if kind == 0:
            st.append(e)
            continue
        cls, ms = want[e["args"]["correlation"]]
        outer = st[0]["name"] if st else "(none)"
        inner = st[-1]["name"] if st else "(none)"
        a = agg.setdefault((cls, outer, inner), {"count": 0, "ms": 0.0})
        a["count"] += 1
        a["ms"] += ms
    rows = sorted(agg.items(), key=lambda kv: -kv[1]["ms"])[:top]
    return [{"class": k[0], "outer": k[1][:90], "inner": k[2][:60], "count": v["count"], "ms": round(v["ms"], 3)}
            for k, v in rows]


def summarize(path, wanted=()):
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
    top = sorted(by_name.items(), key=lambda kv: -kv[1]["ms"])[:30]
    out = {
        "trace": path,
        "kernels": sum(1 for e in kernels if e["cat"] == "kernel"),
        "kernel_launches": len(launches),
        "cpu_ops": len(cpu_ops),
        "kernel_ms": round(total, 3),
        "gpu_span_ms": round(span, 3),
        "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1]["ms"])),
        "top": [{"name": n, "class": v["class"], "ms": round(v["ms"], 3), "count": v["count"]} for n, v in top],
    }
    if wanted:
        out["attribution"] = attribute(events, kernels, set(wanted))
    return out


def main(argv):
    args, wanted = argv[1:], ()
    if args and args[0] == "--attribute":
        if len(args) < 2:
            print("kernel_classes: --attribute needs a comma-separated list of classes", file=sys.stderr)
            return 2
        wanted, args = tuple(c for c in args[1].split(",") if c), args[2:]
    if not args:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for p in args:
        try:
            print(json.dumps(summarize(p, wanted)))
        except (OSError, ValueError, KeyError) as e:
            print(f"kernel_classes: {p}: not a readable Chrome trace ({e})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
