"""Parity with the implementation users run today: diffusers' FluxTransformer2DModel.

A tiny random diffusers model is saved by diffusers itself (diffusers layout), converted to the
BFL single-file layout by this script's own key mapping, and run by `fluxtrain forward` from both
layouts; outputs must equal diffusers' to 1e-5 relative (float32), for a dev-style model
(guidance embedding) and a schnell-style one. Also checks that files fluxtrain writes load in the
safetensors package (init-model's BFL file and its diffusers folder, by diffusers itself).
"""
import os
import subprocess
import sys
import tempfile

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_forward_inputs import grid_ids  # noqa: E402

BIN = os.environ["FLUXTRAIN_BIN"]
TOL = 1e-5
H, HEADS, D = 64, 4, 16


def to_bfl(sd, depth, single):
    """diffusers -> BFL keys, written independently of fluxtrain's C++ mapping."""
    out = {}
    cat = lambda *ks: torch.cat([sd[k] for k in ks], 0)  # noqa: E731
    for s in ("weight", "bias"):
        out[f"img_in.{s}"] = sd[f"x_embedder.{s}"]
        out[f"txt_in.{s}"] = sd[f"context_embedder.{s}"]
        for a, b in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
            if f"time_text_embed.{b}.linear_1.{s}" in sd:
                out[f"{a}.in_layer.{s}"] = sd[f"time_text_embed.{b}.linear_1.{s}"]
                out[f"{a}.out_layer.{s}"] = sd[f"time_text_embed.{b}.linear_2.{s}"]
        out[f"final_layer.linear.{s}"] = sd[f"proj_out.{s}"]
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale], 0)
        for i in range(depth):
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[b + f"img_mod.lin.{s}"] = sd[d + f"norm1.linear.{s}"]
            out[b + f"txt_mod.lin.{s}"] = sd[d + f"norm1_context.linear.{s}"]
            out[b + f"img_attn.qkv.{s}"] = cat(*(d + f"attn.to_{x}.{s}" for x in "qkv"))
            out[b + f"txt_attn.qkv.{s}"] = cat(*(d + f"attn.add_{x}_proj.{s}" for x in "qkv"))
            out[b + f"img_attn.proj.{s}"] = sd[d + f"attn.to_out.0.{s}"]
            out[b + f"txt_attn.proj.{s}"] = sd[d + f"attn.to_add_out.{s}"]
            out[b + f"img_mlp.0.{s}"] = sd[d + f"ff.net.0.proj.{s}"]
            out[b + f"img_mlp.2.{s}"] = sd[d + f"ff.net.2.{s}"]
            out[b + f"txt_mlp.0.{s}"] = sd[d + f"ff_context.net.0.proj.{s}"]
            out[b + f"txt_mlp.2.{s}"] = sd[d + f"ff_context.net.2.{s}"]
        for i in range(single):
            d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[b + f"linear1.{s}"] = cat(*(d + f"attn.to_{x}.{s}" for x in "qkv"), d + f"proj_mlp.{s}")
            out[b + f"linear2.{s}"] = sd[d + f"proj_out.{s}"]
            out[b + f"modulation.lin.{s}"] = sd[d + f"norm.linear.{s}"]
    for i in range(depth):
        d, b = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out[b + "img_attn.norm.query_norm.scale"] = sd[d + "norm_q.weight"]
        out[b + "img_attn.norm.key_norm.scale"] = sd[d + "norm_k.weight"]
        out[b + "txt_attn.norm.query_norm.scale"] = sd[d + "norm_added_q.weight"]
        out[b + "txt_attn.norm.key_norm.scale"] = sd[d + "norm_added_k.weight"]
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out[b + "norm.query_norm.scale"] = sd[d + "norm_q.weight"]
        out[b + "norm.key_norm.scale"] = sd[d + "norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fluxtrain {' '.join(args)} failed: {r.stderr}")


def parity(guidance, tmp):
    torch.manual_seed(0 if guidance else 1)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=D, num_attention_heads=HEADS, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():  # default init leaves some biases/norms trivial: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    snap = os.path.join(tmp, "dev" if guidance else "schnell")
    model.save_pretrained(os.path.join(snap, "transformer"))
    # The snapshot layout: BFL file at the root, its config from transformer/config.json.
    bfl_snap = os.path.join(tmp, "bfl_" + ("dev" if guidance else "schnell"))
    model.save_pretrained(os.path.join(bfl_snap, "transformer"))
    for f in os.listdir(os.path.join(bfl_snap, "transformer")):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(bfl_snap, "transformer", f))
    save_file(to_bfl(model.state_dict(), 2, 2), os.path.join(bfl_snap, "flux1-dev.safetensors"))

    B, N, T = 2, 4, 7
    g = torch.Generator().manual_seed(5)
    inp = {"img": torch.randn(B, N * N, 64, generator=g), "img_ids": grid_ids(N, N).float(),
           "txt": torch.randn(B, T, 32, generator=g), "txt_ids": torch.zeros(T, 3),
           "y": torch.randn(B, 16, generator=g), "timesteps": torch.rand(B, generator=g)}
    if guidance:
        inp["guidance"] = torch.full((B,), 3.5)
    inputs = os.path.join(tmp, "in.safetensors")
    save_file(inp, inputs)
    with torch.no_grad():
        ref = model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                    timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"],
                    guidance=inp.get("guidance"), return_dict=False)[0]
    worst = 0.0
    for src in (snap, bfl_snap):
        out = os.path.join(tmp, "out.safetensors")
        run("forward", "--pretrained_model_name_or_path", src, "--inputs", inputs, "--output", out)
        e = rel(load_file(out)["output"], ref)
        print(f"{'dev' if guidance else 'schnell'} {'diffusers' if src == snap else 'bfl'}: rel err {e:.2e}")
        worst = max(worst, e)
    return worst


def fluxtrain_files_load_in_python(tmp):
    snap = os.path.join(tmp, "init")
    run("init-model", "--size", "tiny", "--output_dir", snap, "--max_shard_size_mb", "0.2")
    bfl = load_file(os.path.join(snap, "flux1-dev.safetensors"))
    model = FluxTransformer2DModel.from_pretrained(os.path.join(snap, "transformer"))
    mine = to_bfl(model.state_dict(), 2, 2)
    assert set(mine) == set(bfl), set(mine) ^ set(bfl)
    for k in bfl:
        assert torch.equal(mine[k], bfl[k]), k
    print(f"init-model: {len(bfl)} BFL tensors equal the diffusers folder as diffusers loads it")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        errs = [parity(True, tmp), parity(False, tmp)]
        fluxtrain_files_load_in_python(tmp)
    if max(errs) > TOL:
        print(f"FAIL: max relative error {max(errs):.2e} > {TOL}")
        return 1
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
