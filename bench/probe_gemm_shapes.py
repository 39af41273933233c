#!/usr/bin/env python3
"""Probe (issue 15): how fast cuBLAS runs each frozen-weight GEMM of one FLUX block at a bench
configuration, forward (x @ W^T + b) and backward (dY @ W), in bf16 on the GPU, and what the
same work costs with the image and condition rows in one GEMM (they share the image stream's
weights) or with the text stream's GEMMs on a second stream beside the image stream's. Prints one
JSON line per case: ms (median of CUDA-event timings), TFLOP/s.

  python3 bench/probe_gemm_shapes.py --cond 1024 --noise 4096 --txt 512
"""
import argparse
import json

import torch


def timed(fn, reps=30, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--noise", type=int, default=4096)
    ap.add_argument("--cond", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=3072)
    a = ap.parse_args()
    H = a.hidden
    dev, dt = "cuda", torch.bfloat16
    weights = {"qkv": (H, 3 * H), "proj": (H, H), "mlp0": (H, 4 * H), "mlp2": (4 * H, H)}
    W = {k: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for k, (i, o) in weights.items()}
    bias = {k: torch.randn(o, device=dev, dtype=dt) for k, (i, o) in weights.items()}
    rows = {"txt": a.txt, "img": a.noise, "cond": a.cond, "main": a.txt + a.noise, "img+cond": a.noise + a.cond,
            "all": a.txt + a.noise + a.cond}
    X = {}
    results = []

    def emit(**kw):
        print(json.dumps(kw), flush=True)
        results.append(kw)

    for name, m in rows.items():
        for wn, (i, o) in weights.items():
            x = torch.randn(m, i, device=dev, dtype=dt)
            dy = torch.randn(m, o, device=dev, dtype=dt)
            X[(name, wn)] = (x, dy)
            f = timed(lambda: torch.nn.functional.linear(x, W[wn], bias[wn]))
            b = timed(lambda: dy @ W[wn])
            fl = 2.0 * m * i * o
            emit(rows=name, m=m, weight=wn, fwd_ms=round(f, 4), bwd_ms=round(b, 4),
                 fwd_tflops=round(fl / f / 1e9, 1), bwd_tflops=round(fl / b / 1e9, 1))

    # Text stream's GEMMs on a second stream beside the image stream's (forward and backward).
    s2 = torch.cuda.Stream()
    for wn in weights:
        xi, dyi = X[("img", wn)]
        xt, dyt = X[("txt", wn)]

        def serial():
            torch.nn.functional.linear(xi, W[wn], bias[wn])
            torch.nn.functional.linear(xt, W[wn], bias[wn])

        def side():
            s2.wait_stream(torch.cuda.current_stream())
            torch.nn.functional.linear(xi, W[wn], bias[wn])
            with torch.cuda.stream(s2):
                torch.nn.functional.linear(xt, W[wn], bias[wn])
            torch.cuda.current_stream().wait_stream(s2)

        emit(case="txt beside img", weight=wn, serial_ms=round(timed(serial), 4), two_streams_ms=round(timed(side), 4))


if __name__ == "__main__":
    main()
