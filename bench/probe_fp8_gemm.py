#!/usr/bin/env python3
"""fp8 against bf16 GEMMs at FLUX.1-dev's linear shapes on the GPU (issue 14 item 1 / issue 15
item 4: "measure both"): for each (tokens, in, out) the bf16 `x @ W^T`, the dequantise-then-bf16
path fluxtrain runs today (e4m3 codes x per-channel scale -> bf16 weight, then the GEMM), and
`torch._scaled_mm` on e4m3 with per-tensor and row-wise scales, the activation quantised in the
timed region (amax + cast), with the relative error of each against a float32 GEMM of the same
bf16 inputs. One JSON line per shape.
  python3 bench/probe_fp8_gemm.py [--tokens 3392,1472]
"""
import argparse, json
import torch

E4M3_MAX = 448.0


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1472,3392,5632")  # 192/384, 384/768, 512/1024 (+512 text)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    # FLUX.1-dev linears: qkv (3072->9216), proj (3072->3072), mlp up (3072->12288), mlp down
    # (12288->3072), single linear1 (3072->21504), single linear2 (15360->3072)
    shapes = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
    for M in [int(t) for t in a.tokens.split(",")]:
        for K, N in shapes:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = (torch.randn(N, K, device=dev) * K ** -0.5).to(torch.bfloat16)
            ref = x.float() @ w.float().t()
            # per-channel e4m3 weight (what fluxtrain stores)
            wscale = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX  # [N,1]
            wq = (w.float() / wscale).to(torch.float8_e4m3fn)
            deq = lambda: (wq.float() * wscale).to(torch.bfloat16)
            flops = 2.0 * M * K * N
            row = {"name": "fp8_gemm", "tokens": M, "in": K, "out": N}
            t = timed(lambda: x @ w.t())
            row["bf16_ms"] = round(t, 4)
            row["bf16_tflops"] = round(flops / t / 1e9, 1)
            t = timed(lambda: x @ deq().t())
            row["dequant_bf16_ms"] = round(t, 4)
            y = x @ deq().t()
            row["dequant_rel_err"] = float((y.float() - ref).norm() / ref.norm())
            # _scaled_mm: a row-major [M,K], b column-major [K,N] (= wq [N,K] row-major transposed)
            b = wq.t()
            try:
                def rowwise():
                    xs = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
                    xq = (x.float() / xs).to(torch.float8_e4m3fn)
                    return torch._scaled_mm(xq, b, scale_a=xs, scale_b=wscale.t().contiguous(),
                                            out_dtype=torch.bfloat16)
                t = timed(rowwise)
                row["scaled_mm_rowwise_ms"] = round(t, 4)
                row["scaled_mm_rowwise_tflops"] = round(flops / t / 1e9, 1)
                row["scaled_mm_rowwise_rel_err"] = float((rowwise().float() - ref).norm() / ref.norm())
                xs0 = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
                xq0 = (x.float() / xs0).to(torch.float8_e4m3fn)
                sb = wscale.t().contiguous()
                t = timed(lambda: torch._scaled_mm(xq0, b, scale_a=xs0, scale_b=sb, out_dtype=torch.bfloat16))
                row["scaled_mm_rowwise_gemm_only_ms"] = round(t, 4)
                row["scaled_mm_rowwise_gemm_only_tflops"] = round(flops / t / 1e9, 1)
            except Exception as ex:  # noqa: BLE001
                row["scaled_mm_rowwise_error"] = str(ex)[:200]
            try:
                wt_scale = w.float().abs().amax().clamp_min(1e-12) / E4M3_MAX
                wqt = (w.float() / wt_scale).to(torch.float8_e4m3fn)

                def tensorwise():
                    xs = x.float().abs().amax().clamp_min(1e-12) / E4M3_MAX
                    xq = (x.float() / xs).to(torch.float8_e4m3fn)
                    return torch._scaled_mm(xq, wqt.t(), scale_a=xs, scale_b=wt_scale, out_dtype=torch.bfloat16)
                t = timed(tensorwise)
                row["scaled_mm_tensor_ms"] = round(t, 4)
                row["scaled_mm_tensor_rel_err"] = float((tensorwise().float() - ref).norm() / ref.norm())
            except Exception as ex:  # noqa: BLE001
                row["scaled_mm_tensor_error"] = str(ex)[:200]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
