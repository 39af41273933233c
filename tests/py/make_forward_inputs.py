"""Writes a `fluxtrain forward` inputs file (docs/forward.md) with random tensors.

usage: make_forward_inputs.py OUT.safetensors [--batch B] [--grid N] [--txt T] [--context C]
       [--vec V] [--channels K] [--cond N] [--cond_grid G] [--no-guidance] [--seed S]
"""
import argparse

import torch
from safetensors.torch import save_file


def grid_ids(h, w, row_offset=0.0, row_scale=1.0, col_scale=1.0):
    ids = torch.zeros(h, w, 3, dtype=torch.float64)
    ids[..., 1] = torch.arange(h, dtype=torch.float64)[:, None] * row_scale + row_offset
    ids[..., 2] = torch.arange(w, dtype=torch.float64)[None, :] * col_scale
    return ids.reshape(h * w, 3)


def make(args):
    g = torch.Generator().manual_seed(args.seed)
    B, N, T = args.batch, args.grid, args.txt
    t = {
        "img": torch.randn(B, N * N, args.channels, generator=g),
        "img_ids": grid_ids(N, N).float(),
        "txt": torch.randn(B, T, args.context, generator=g),
        "txt_ids": torch.zeros(T, 3),
        "y": torch.randn(B, args.vec, generator=g),
        "timesteps": torch.rand(B, generator=g),
    }
    if not args.no_guidance:
        t["guidance"] = torch.full((B,), 3.5)
    if args.cond:
        G = args.cond_grid
        conds = [torch.randn(B, G * G, args.channels, generator=g) for _ in range(args.cond)]
        ids = [grid_ids(G, G, row_offset=64.0) if n % 2 == 0 else grid_ids(G, G, 0.0, N / G, N / G)
               for n in range(args.cond)]
        t["cond"] = torch.stack(conds) if args.cond > 1 else conds[0]
        t["cond_ids"] = (torch.stack(ids) if args.cond > 1 else ids[0]).float()
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--txt", type=int, default=7)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--vec", type=int, default=16)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--cond", type=int, default=0)
    p.add_argument("--cond_grid", type=int, default=3)
    p.add_argument("--no-guidance", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    save_file({k: v.contiguous() for k, v in make(args).items()}, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
