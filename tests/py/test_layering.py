"""The include graph of fluxtrain's folders keeps its layers (docs/architecture.md):

- no cycles between folders;
- src/core includes nothing above it (no model, data, train, cli, dist, encoders);
- src/model includes no dist/ (the model knows no ranks);
- dist/ includes nothing FLUX-specific (no src/model, src/encoders, src/data, src/train, src/cli),
  except the provider interface it implements (src/model/block_weights.h: per-block maps of
  tensors, no FLUX in it).

Run with --dot FILE to write the folder graph in Graphviz format (docs/include-graph.svg is made
from it with `dot -Tsvg`).
"""
import os
import re
import sys

ROOT = os.environ.get("FLUXTRAIN_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
FOLDERS = ["src/core", "src/model", "src/encoders", "src/data", "src/train", "src/cli", "dist", "kernels", "bench"]
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def folder_of(path):
    for f in FOLDERS:
        if path.startswith(f + "/"):
            return f
    return None


def target_folder(inc):
    # Includes are relative to the repository root ("dist/x.h") or to src/ ("model/x.h").
    for cand in (inc, "src/" + inc):
        f = folder_of(cand)
        if f and os.path.exists(os.path.join(ROOT, cand)):
            return f
    return None


def graph():
    edges = {}
    for f in FOLDERS:
        base = os.path.join(ROOT, f)
        if not os.path.isdir(base):
            continue
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.endswith((".h", ".cpp", ".cu")):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                rel = os.path.relpath(path, ROOT)
                for inc in INCLUDE.findall(text):
                    t = target_folder(inc)
                    if t and t != f:
                        edges.setdefault((f, t), []).append(f"{rel} -> {inc}")
    return edges


def find_cycle(edges):
    adj = {}
    for (a, b) in edges:
        adj.setdefault(a, set()).add(b)
    state = {}

    def visit(n, stack):
        state[n] = 1
        for m in adj.get(n, ()):
            if state.get(m) == 1:
                return stack + [n, m]
            if not state.get(m):
                c = visit(m, stack + [n])
                if c:
                    return c
        state[n] = 2
        return None

    for n in list(adj):
        if not state.get(n):
            c = visit(n, [])
            if c:
                return c
    return None


def main():
    edges = graph()
    if "--dot" in sys.argv:
        out = sys.argv[sys.argv.index("--dot") + 1]
        with open(out, "w") as fh:
            fh.write("digraph fluxtrain {\n  rankdir=BT;\n  node [shape=box];\n")
            for (a, b), why in sorted(edges.items()):
                fh.write(f'  "{a}" -> "{b}" [label="{len(why)}"];\n')
            fh.write("}\n")
    bad = []
    forbidden = {
        "src/core": {"src/model", "src/encoders", "src/data", "src/train", "src/cli", "dist", "bench"},
        "src/model": {"dist", "src/train", "src/cli", "src/data", "bench"},
        "dist": {"src/model", "src/encoders", "src/data", "src/train", "src/cli", "bench"},
    }
    allowed = {("dist", "model/block_weights.h")}
    for (a, b), why in sorted(edges.items()):
        if b in forbidden.get(a, ()):
            why = [w for w in why if (a, w.split(" -> ")[1]) not in allowed]
            if why:
                bad.append(f"{a} must not include {b}: " + "; ".join(why[:3]))
    cycle = find_cycle(edges)
    if cycle:
        bad.append("cycle between folders: " + " -> ".join(cycle))
    for (a, b), why in sorted(edges.items()):
        print(f"{a} -> {b} ({len(why)} includes)")
    if bad:
        print("\n".join(bad))
        sys.exit(1)
    print("layering: ok (no cycles, core and dist free of upward includes, model free of dist)")


if __name__ == "__main__":
    main()
