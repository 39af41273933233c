"""PyTorch's own clipping + AdamW on the inputs tests/unit/test_adamw_torch_reference.cpp writes
(not a test by itself: that C++ test runs it and compares fluxtrain's optimizer with its output).

  python3 adamw_reference.py IN OUT LR_SCALES MAX_NORM BETA1 BETA2 EPS WEIGHT_DECAY

IN holds p.<i> (initial parameters), g.<t>.<i> (the gradient of parameter i at update t), lr
([T] float64) and group ([n] int64: each parameter's group index). One update per t: the schedule
rate lr[t] times the group's scale, torch.nn.utils.clip_grad_norm_ over every parameter (one
coefficient for all groups), then torch.optim.AdamW (decoupled weight decay, foreach=False), all
in float64. OUT: p.<i>, exp_avg.<i>, exp_avg_sq.<i> after the last update and norm ([T]).
"""
import sys

import torch
from safetensors.torch import load_file, save_file

src, dst = sys.argv[1], sys.argv[2]
scales = [float(x) for x in sys.argv[3].split(",")]
max_norm, b1, b2, eps, wd = (float(x) for x in sys.argv[4:9])
t_in = load_file(src)
n = sum(1 for k in t_in if k.startswith("p."))
params = [torch.nn.Parameter(t_in[f"p.{i}"].clone()) for i in range(n)]
group_of = t_in["group"].tolist()
groups = [{"params": [p for p, g in zip(params, group_of) if g == k], "lr": 0.0} for k in range(len(scales))]
opt = torch.optim.AdamW(groups, lr=0.0, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
lrs = t_in["lr"].tolist()
norms = []
for t, lr in enumerate(lrs):
    for p, i in zip(params, range(n)):
        p.grad = t_in[f"g.{t}.{i}"].clone()
    for g, s in zip(opt.param_groups, scales):
        g["lr"] = lr * s
    norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    opt.step()
out = {"norm": torch.tensor(norms, dtype=torch.float64)}
for i, p in enumerate(params):
    st = opt.state[p]
    out[f"p.{i}"] = p.detach().clone()
    out[f"exp_avg.{i}"] = st["exp_avg"].clone()
    out[f"exp_avg_sq.{i}"] = st["exp_avg_sq"].clone()
save_file(out, dst)
