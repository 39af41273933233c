"""Which calls make cuDNN's fused attention fail (issue 15: plain-LoRA mode crashed under cuDNN)?

Each case runs in its own process (an illegal memory access poisons the CUDA context): SDPA
restricted to cuDNN, bf16, [1, 24, L, 128], forward + backward a few times, synchronised.
Variables: query and key lengths; q/k/v dense and separate, or views into one [3, B, h, L, D]
buffer (what the fused QK kernel hands over); the output gradient dense, or in the
merged-heads layout (the backward of o.transpose(1, 2).reshape(B, L, h*D)).
Prints one JSON line per case. Usage: python3 bench/probe_cudnn_attention.py [--quick]
"""
import json
import subprocess
import sys


def run_case(lq, lk, shared, merged, iters):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    torch.manual_seed(0)
    B, h, D = 1, 24, 128
    dev, dt = "cuda", torch.bfloat16
    if shared:
        assert lq == lk
        buf = torch.randn(3, B, h, lq, D, device=dev, dtype=dt)
        q, k, v = (buf[i].detach().requires_grad_() for i in range(3))
    else:
        q = torch.randn(B, h, lq, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(B, h, lk, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, h, lk, D, device=dev, dtype=dt, requires_grad=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for _ in range(iters):
            o = F.scaled_dot_product_attention(q, k, v)
            if merged:
                y = o.transpose(1, 2).reshape(B, lq, h * D)
                y.backward(torch.randn_like(y))
            else:
                o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        o = F.scaled_dot_product_attention(q, k, v)
        o.backward(torch.randn_like(o))
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        lq, lk, shared, merged = (int(x) for x in sys.argv[2:6])
        ms = run_case(lq, lk, bool(shared), bool(merged), 5)
        print(json.dumps({"ms": round(ms, 3)}))
        return
    lengths = [1536, 2816, 4608] if "--quick" in sys.argv else [1536, 2816, 3392, 4096, 4608, 5632]
    cases = [(l, l, s, m) for l in lengths for s in (0, 1) for m in (0, 1)]
    cases += [(2304, 4608, 0, 1), (4608, 5632, 0, 1), (2816, 3392, 0, 1)]
    for lq, lk, s, m in cases:
        p = subprocess.run([sys.executable, __file__, "--case", str(lq), str(lk), str(s), str(m)],
                           capture_output=True, text=True, timeout=120)
        line = {"lq": lq, "lk": lk, "shared_qkv": bool(s), "merged_grad": bool(m), "rc": p.returncode}
        if p.returncode == 0:
            line.update(json.loads(p.stdout.strip().splitlines()[-1]))
        else:
            err = [x for x in p.stderr.splitlines() if "Error" in x or "error" in x]
            line["error"] = (err[-1] if err else p.stderr[-200:])[:200]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
