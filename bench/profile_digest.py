#!/usr/bin/env python3
"""Prints bench/kernel_classes.py's JSON lines as a table to read in a device call's output: per
trace the kernel and span ms, each class's ms and kernel count, the top kernels (T) and, where
--attribute was given, the host ops that launched them (A).

  python3 bench/profile_digest.py out/kernel_classes.jsonl
"""
import json
import sys

for line in open(sys.argv[1]):
    d = json.loads(line)
    print(d.get("trace"), "kernels", d["kernel_ms"], "span", d["gpu_span_ms"], "n", d["kernels"])
    for k, v in d["classes"].items():
        print("  %-12s %8.2f %5d" % (k, v["ms"], v["count"]))
    for e in d["top"]:
        print("  T %7.2f %4d %s" % (e["ms"], e["count"], e["name"][:110]))
    for e in d.get("attribution", []):
        print("  A %-10s %7.2f %4d %s | %s" % (e["class"], e["ms"], e["count"], e["outer"][:80], e["inner"]))
