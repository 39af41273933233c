"""The FLUX autoencoder against the implementation users run today: diffusers' AutoencoderKL.

A tiny random AutoencoderKL with FLUX's structure (16 latent channels, GroupNorm 32, 2 resnets per
level, mid-block attention, no quant convs, FLUX's scaling/shift) is saved by diffusers (vae/
folder) and converted to BFL's ae.safetensors names by this script's own mapping (written from
diffusers' convert_ldm_vae_checkpoint rules, not from fluxtrain's code). `fluxtrain vae` encodes and
decodes from both layouts:
  - encode: posterior mean (shifted, scaled) and logvar equal diffusers' to 1e-5 relative (float32)
  - decode: equal diffusers' decode of (z / scaling + shift) to 1e-5 relative
  - both layouts give bit-identical outputs (they load to identical weights)
  - tiled vs untiled decode of a smooth image: bound stated below (TILED_BOUND)
  - init-model's tiny vae/ folder loads in diffusers and decodes like fluxtrain
  - strict loading: a missing key is one error line naming it, exit 2
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

BIN = os.environ["FLUXTRAIN_BIN"]
TOL = 1e-5
# Tiled vs untiled of a smooth image, |diff| / max |untiled|. Tiles see their own GroupNorm
# statistics and attend only within the tile; with random weights that is a large change
# (measured: decode max 0.56, mean 0.049; encode max 0.85, mean 0.10, at 64 px tiles on a
# 128x96 image): these bounds catch regressions of the tiling, they do not claim it is exact.
# The blending itself is exact (tests/unit/test_autoencoder_tiling.cpp: a local function tiled
# equals it untiled).
TILED_BOUND = 0.7
TILED_MEAN_BOUND = 0.07
TILED_ENCODE_BOUND = 1.0
TILED_ENCODE_MEAN_BOUND = 0.15


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run(*args, expect_rc=0):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != expect_rc:
        raise SystemExit(f"fluxtrain {' '.join(args)}: rc {r.returncode}, expected {expect_rc}: {r.stderr}")
    return r


def to_bfl(sd, levels, layers):
    """diffusers AutoencoderKL -> BFL ae.safetensors names (inverse of convert_ldm_vae_checkpoint)."""
    out = {}

    def res(dst, src):
        for n in ("norm1", "conv1", "norm2", "conv2"):
            for s in ("weight", "bias"):
                out[f"{dst}.{n}.{s}"] = sd[f"{src}.{n}.{s}"]
        if f"{src}.conv_shortcut.weight" in sd:
            for s in ("weight", "bias"):
                out[f"{dst}.nin_shortcut.{s}"] = sd[f"{src}.conv_shortcut.{s}"]

    for side in ("encoder", "decoder"):
        for s in ("weight", "bias"):
            out[f"{side}.conv_in.{s}"] = sd[f"{side}.conv_in.{s}"]
            out[f"{side}.conv_out.{s}"] = sd[f"{side}.conv_out.{s}"]
            out[f"{side}.norm_out.{s}"] = sd[f"{side}.conv_norm_out.{s}"]
            out[f"{side}.mid.attn_1.norm.{s}"] = sd[f"{side}.mid_block.attentions.0.group_norm.{s}"]
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
                t = sd[f"{side}.mid_block.attentions.0.{b}.{s}"]
                out[f"{side}.mid.attn_1.{a}.{s}"] = t[:, :, None, None] if s == "weight" else t
        res(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        res(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
    for i in range(levels):
        for j in range(layers):
            res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != levels - 1:
            for s in ("weight", "bias"):
                out[f"encoder.down.{i}.downsample.conv.{s}"] = sd[f"encoder.down_blocks.{i}.downsamplers.0.conv.{s}"]
        u = levels - 1 - i  # decoder levels are numbered in reverse
        for j in range(layers + 1):
            res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        if i != 0:
            for s in ("weight", "bias"):
                out[f"decoder.up.{i}.upsample.conv.{s}"] = sd[f"decoder.up_blocks.{u}.upsamplers.0.conv.{s}"]
    assert len(out) == len(sd), (len(out), len(sd))
    return {k: v.contiguous() for k, v in out.items()}


def smooth_image(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    chans = []
    for c in range(3):
        a, p, q = torch.rand(3, generator=g)
        chans.append(0.8 * torch.sin(6.28 * (a * x + p * y) + q * 6))
    return torch.stack(chans)[None].repeat(b, 1, 1, 1)


def main():
    torch.manual_seed(0)
    levels, layers = 4, 2
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=layers, latent_channels=16, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=True)
    with torch.no_grad():  # default init leaves norms at 1/0: make every weight matter
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.eval()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        snap = os.path.join(tmp, "snap")
        vae.save_pretrained(os.path.join(snap, "vae"))
        bfl = os.path.join(tmp, "ae.safetensors")
        save_file(to_bfl(vae.state_dict(), levels, layers), bfl)

        g = torch.Generator().manual_seed(1)
        images = (torch.rand(2, 3, 64, 48, generator=g) * 2 - 1)
        z_in = torch.randn(2, 16, 6, 10, generator=g)
        save_file({"images": images}, os.path.join(tmp, "img.safetensors"))
        save_file({"latents": z_in}, os.path.join(tmp, "lat.safetensors"))
        with torch.no_grad():
            post = vae.encode(images).latent_dist
            ref_lat = (post.mean - 0.1159) * 0.3611
            ref_logvar = torch.chunk(vae.encoder(images), 2, dim=1)[1]
            ref_img = vae.decode(z_in / 0.3611 + 0.1159).sample

        outs = {}
        for name, src in (("diffusers", snap), ("bfl", bfl)):
            e = os.path.join(tmp, f"enc_{name}.safetensors")
            d = os.path.join(tmp, f"dec_{name}.safetensors")
            run("vae", "--pretrained_model_name_or_path", src, "--encode", os.path.join(tmp, "img.safetensors"),
                "--output", e)
            run("vae", "--pretrained_model_name_or_path", src, "--decode", os.path.join(tmp, "lat.safetensors"),
                "--output", d)
            enc, dec = load_file(e), load_file(d)
            outs[name] = (enc, dec)
            err_mean = rel(enc["latents"], ref_lat)
            err_logvar = rel(enc["moments"][:, 16:], ref_logvar)
            err_dec = rel(dec["images"], ref_img)
            print(f"{name}: encode mean rel err {err_mean:.2e}, logvar {err_logvar:.2e}; decode {err_dec:.2e}")
            for what, err in (("encode mean", err_mean), ("encode logvar", err_logvar), ("decode", err_dec)):
                if not err <= TOL:
                    failures.append(f"{name} {what}: {err:.2e} > {TOL}")
        for k in ("latents", "moments"):
            if not torch.equal(outs["bfl"][0][k], outs["diffusers"][0][k]):
                failures.append(f"bfl and diffusers layouts differ in {k}")
        if not torch.equal(outs["bfl"][1]["images"], outs["diffusers"][1]["images"]):
            failures.append("bfl and diffusers layouts differ in decode")

        # Tiled vs untiled decode of a smooth image's latents (128x96 px, 64 px tiles, 16 px overlap).
        smooth = smooth_image(1, 128, 96, 3)
        with torch.no_grad():
            zs = (vae.encode(smooth).latent_dist.mean - 0.1159) * 0.3611
        save_file({"latents": zs.contiguous()}, os.path.join(tmp, "slat.safetensors"))
        for tile_args, tag in (([], "untiled"), (["--tile_size", "64", "--tile_overlap", "16"], "tiled")):
            run("vae", "--pretrained_model_name_or_path", snap, "--decode", os.path.join(tmp, "slat.safetensors"),
                "--output", os.path.join(tmp, f"s_{tag}.safetensors"), *tile_args)
        un = load_file(os.path.join(tmp, "s_untiled.safetensors"))["images"]
        ti = load_file(os.path.join(tmp, "s_tiled.safetensors"))["images"]
        e_max = rel(ti, un)
        e_mean = ((ti - un).abs().mean() / un.abs().max()).item()
        print(f"tiled vs untiled decode (smooth 128x96, tile 64, overlap 16): max {e_max:.3f}, mean {e_mean:.4f} "
              f"(bounds {TILED_BOUND}, {TILED_MEAN_BOUND})")
        if not (e_max < TILED_BOUND and e_mean < TILED_MEAN_BOUND):
            failures.append(f"tiled decode differs by {e_max:.3f} / mean {e_mean:.4f}")
        # Tiled encode: same bound on the latents.
        save_file({"images": smooth.contiguous()}, os.path.join(tmp, "simg.safetensors"))
        for tile_args, tag in (([], "untiled"), (["--tile_size", "64", "--tile_overlap", "16"], "tiled")):
            run("vae", "--pretrained_model_name_or_path", snap, "--encode", os.path.join(tmp, "simg.safetensors"),
                "--output", os.path.join(tmp, f"se_{tag}.safetensors"), *tile_args)
        eu = load_file(os.path.join(tmp, "se_untiled.safetensors"))["latents"]
        et = load_file(os.path.join(tmp, "se_tiled.safetensors"))["latents"]
        e_mean = ((et - eu).abs().mean() / eu.abs().max()).item()
        print(f"tiled vs untiled encode: max {rel(et, eu):.3f}, mean {e_mean:.4f}")
        if not (rel(et, eu) < TILED_ENCODE_BOUND and e_mean < TILED_ENCODE_MEAN_BOUND):
            failures.append(f"tiled encode differs by {rel(et, eu):.3f} / mean {e_mean:.4f}")

        # init-model's tiny autoencoder: diffusers loads its vae/ folder; same decode as fluxtrain.
        tiny = os.path.join(tmp, "tiny")
        run("init-model", "--size", "tiny", "--output_dir", tiny)
        tv = AutoencoderKL.from_pretrained(os.path.join(tiny, "vae")).eval()
        idx = json.load(open(os.path.join(tiny, "model_index.json")))
        if idx.get("vae") != ["diffusers", "AutoencoderKL"]:
            failures.append("model_index.json does not list the vae")
        z = torch.randn(1, 16, 4, 6, generator=g)
        save_file({"latents": z}, os.path.join(tmp, "tl.safetensors"))
        for src in (tiny, os.path.join(tiny, "ae.safetensors")):
            run("vae", "--pretrained_model_name_or_path", src, "--decode", os.path.join(tmp, "tl.safetensors"),
                "--output", os.path.join(tmp, "td.safetensors"))
            with torch.no_grad():
                want = tv.decode(z / tv.config.scaling_factor + tv.config.shift_factor).sample
            err = rel(load_file(os.path.join(tmp, "td.safetensors"))["images"], want)
            print(f"init-model tiny ({os.path.basename(src)}) vs diffusers: {err:.2e}")
            if not err <= TOL:
                failures.append(f"init-model tiny vae decode differs: {err:.2e}")

        # Strict loading: a missing key names itself.
        sd = load_file(bfl)
        del sd["decoder.mid.attn_1.q.weight"]
        save_file(sd, os.path.join(tmp, "broken.safetensors"))
        r = run("vae", "--pretrained_model_name_or_path", os.path.join(tmp, "broken.safetensors"), "--decode",
                os.path.join(tmp, "lat.safetensors"), "--output", os.path.join(tmp, "x.safetensors"), expect_rc=2)
        if "missing key decoder.mid.attn_1.q.weight" not in r.stderr or r.stderr.count("\n") != 1:
            failures.append(f"strict loading message: {r.stderr!r}")
        if os.path.exists(os.path.join(tmp, "x.safetensors")):
            failures.append("output written despite the error")

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
