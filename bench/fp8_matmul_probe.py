# GPU probe for kernels/fp8_matmul (--fp8_matmul): checks, with PyTorch on the device, the
# operand layouts and scale shapes that fp8_linear hands to torch._scaled_mm (forward and input
# gradient) against a float64 reference on the same codes, that div with an e4m3 `out` (the
# quantiser's one-pass cast) equals div-then-cast, and times rowwise quantise + _scaled_mm
# against the bf16 GEMM on FLUX.1-dev's linear shapes.  Usage: python3 bench/fp8_matmul_probe.py
import torch, time

dev = "cuda"
print("torch", torch.__version__, torch.cuda.get_device_name())


def quant_rows(x, col_scale=None):
    xs = x.float() * col_scale if col_scale is not None else x
    amax = torch.linalg.vector_norm(xs, float("inf"), dim=1, keepdim=True).float()
    s = (amax / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.empty(xs.shape, dtype=torch.float8_e4m3fn, device=x.device)
    torch.div(xs, s, out=q)
    return q, s


def ref(a8, sa, b8, sb):  # (a8*sa) @ (b8*sb)^T in float64; b8 [N,K], sb [N,1]
    return (a8.double() * sa.double()) @ (b8.double() * sb.double()).t()


torch.manual_seed(0)
M, K, N = 256, 512, 384
x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
w = torch.randn(N, K, device=dev) * torch.rand(N, 1, device=dev)
ws = w.abs().amax(1) / 448
w8 = (w / ws[:, None]).to(torch.float8_e4m3fn)
x8, sx = quant_rows(x)
x8b = (x.float() / sx).to(torch.float8_e4m3fn)
print("div out=e4m3 equals div-then-cast:", torch.equal(x8.view(torch.uint8), x8b.view(torch.uint8)))
y = torch._scaled_mm(x8, w8.t(), sx, ws.view(1, N).contiguous(), out_dtype=torch.bfloat16)
yr = ref(x8, sx, w8, ws[:, None])
print("forward rel err vs ref (max|.|):", ((y.double() - yr).abs().max() / yr.abs().max()).item())
dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
g8, sg = quant_rows(dy, ws.view(1, N))
wt = w8.t().contiguous()  # [K, N] row-major; .t() is [N, K] column-major
dx = torch._scaled_mm(g8, wt.t(), sg, torch.ones(1, K, device=dev), out_dtype=torch.bfloat16)
dxr = ref(g8, sg, wt, torch.ones(K, 1, device=dev))
print("input-grad rel err vs ref:", ((dx.double() - dxr).abs().max() / dxr.abs().max()).item())
dxe = dy.double() @ (w8.double() * ws.double()[:, None])
print("input-grad rel err vs exact dy W:", ((dx.double() - dxe).abs().max() / dxe.abs().max()).item())


def bench(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3


tok = 4096
for (K, N) in [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]:
    x = torch.randn(tok, K, device=dev, dtype=torch.bfloat16)
    wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    w8 = wb.to(torch.float8_e4m3fn); ws = torch.rand(1, N, device=dev)
    dy = torch.randn(tok, N, device=dev, dtype=torch.bfloat16)
    t_bf = bench(lambda: x @ wb.t())
    t_q = bench(lambda: quant_rows(x))
    x8, sx = quant_rows(x)
    t_mm = bench(lambda: torch._scaled_mm(x8, w8.t(), sx, ws, out_dtype=torch.bfloat16))
    t_bwd_bf = bench(lambda: dy @ wb)
    def bwd():
        g8, sg = quant_rows(dy, ws)
        return torch._scaled_mm(g8, w8.t().contiguous().t(), sg, torch.ones(1, K, device=dev), out_dtype=torch.bfloat16)
    t_bwd = bench(bwd)
    fl = 2 * tok * K * N / 1e9
    print(f"K={K} N={N}: fwd bf16 {t_bf:.3f} ms ({fl/t_bf:.0f} TF/s) | quant {t_q:.3f} + scaled_mm {t_mm:.3f} ms "
          f"({fl/t_mm:.0f} TF/s) | bwd-dx bf16 {t_bwd_bf:.3f} ms, fp8 (fold+quant+T+mm) {t_bwd:.3f} ms")
