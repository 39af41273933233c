"""`fluxtrain sample` against the implementation users run today: diffusers' FluxPipeline.

A tiny random pipeline (FluxTransformer2DModel, a FLUX-like AutoencoderKL, CLIPTextModel,
T5EncoderModel, the real CLIP and T5 tokenizer files from tests/data/tokenizers and the
FlowMatchEulerDiscreteScheduler in FLUX.1-dev's or schnell's configuration) is saved with
FluxPipeline.save_pretrained (plus the tokenizer vocabulary files FLUX.1's snapshots carry, which
transformers 5 no longer writes) and sampled by both, from the same prompt and the same initial
latents, 4 steps, at 64x48 pixels (non-square, so a transposed packing would show):
  - dev-style (guidance embedding, dynamic shift) and schnell-style (no guidance, no shift);
  - final latents and the decoded float32 image equal to 1e-4 relative (max |diff| / max |ref|);
  - the PNG equals diffusers' uint8 picture to within one level.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.environ.get("FLUXTRAIN_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
TOK = os.path.join(SRC, "tests", "data", "tokenizers")
TOL = 1e-4
H_PX, W_PX, STEPS = 64, 48, 4
PROMPT = "a photo of a cat, oil painting"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"fluxtrain {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def livelier(*models):
    with torch.no_grad():  # default init leaves norms at 1/0 and biases at 0: make every weight matter
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            m.eval()


def tiny_pipeline(dev, tmp):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0 if dev else 1)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=True)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                        eos_token_id=2, bos_token_id=0, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0))
    livelier(transformer, vae, clip, t5)
    # The tokenizers from the real FLUX files.
    tok_dir = os.path.join(tmp, "tok_src")
    os.makedirs(os.path.join(tok_dir, "clip"), exist_ok=True)
    os.makedirs(os.path.join(tok_dir, "t5"), exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOK, "clip", f), os.path.join(tok_dir, "clip", f))
    shutil.copy(os.path.join(TOK, "t5", "spiece.model"), os.path.join(tok_dir, "t5", "spiece.model"))
    # FLUX's tokenizer configs say 77 and 512 (the bare vocabulary files carry no limit).
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "clip"), model_max_length=77)
    t5_tok = T5Tokenizer.from_pretrained(os.path.join(tok_dir, "t5"), model_max_length=512)
    if dev:  # FLUX.1-dev's scheduler_config.json
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    snap = os.path.join(tmp, "dev" if dev else "schnell")
    pipe.save_pretrained(snap)
    # transformers 5 saves tokenizers as tokenizer.json only; FLUX.1's published snapshots also
    # hold the files fluxtrain reads (vocab.json + merges.txt, spiece.model): put them there too.
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOK, "clip", f), os.path.join(snap, "tokenizer", f))
    shutil.copy(os.path.join(TOK, "t5", "spiece.model"), os.path.join(snap, "tokenizer_2", "spiece.model"))
    return pipe, snap


def parity(dev, tmp):
    from diffusers import FluxPipeline

    pipe, snap = tiny_pipeline(dev, tmp)
    lat_h, lat_w = H_PX // 8, W_PX // 8
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, 16, lat_h, lat_w, generator=g)
    noise_file = os.path.join(tmp, "noise.safetensors")
    save_file({"latents": noise}, noise_file)
    packed = FluxPipeline._pack_latents(noise, 1, 16, lat_h, lat_w)
    guidance = 3.5
    with torch.no_grad():
        out = pipe(PROMPT, height=H_PX, width=W_PX, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=packed, output_type="latent", max_sequence_length=512).images
        ref_lat = FluxPipeline._unpack_latents(out, H_PX, W_PX, pipe.vae_scale_factor)
        z = ref_lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        ref_img = pipe.vae.decode(z, return_dict=False)[0]
    ref_png = ((ref_img[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    png = os.path.join(tmp, "out.png")
    dec = os.path.join(tmp, "decoded.safetensors")
    run("sample", "--pretrained_model_name_or_path", snap, "--prompt", PROMPT, "--output", png,
        "--height", str(H_PX), "--width", str(W_PX), "--num_inference_steps", str(STEPS),
        "--guidance_scale", str(guidance), "--initial_latents", noise_file, "--save_decoded", dec,
        "--device", "cpu", "--dtype", "f32")
    got = load_file(dec)
    el, ei = rel(got["latents"], ref_lat), rel(got["images"], ref_img)
    from PIL import Image
    mine = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
    png_diff = int(np.abs(mine - ref_png.astype(np.int32)).max())
    name = "dev" if dev else "schnell"
    print(f"{name}: latents rel err {el:.2e}, decoded image rel err {ei:.2e}, PNG max level diff {png_diff}")
    assert got["images"].shape == ref_img.shape, (got["images"].shape, ref_img.shape)
    assert el < TOL and ei < TOL, f"{name}: above {TOL}"
    assert png_diff <= 1, f"{name}: PNG differs by {png_diff} levels"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        parity(True, tmp)
        parity(False, tmp)
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
