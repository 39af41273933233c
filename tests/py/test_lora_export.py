"""LoRA files fluxtrain writes, read by diffusers (docs/lora-formats.md).

1. Transformer: a standard LoRA of rank 8 and alpha 4 (scale 0.5: the case diffusers once read at
   scale 1) on a tiny random FluxTransformer2DModel saved by diffusers. fluxtrain writes it in the
   diffusers format and the kohya format (`convert-lora`, the same writer the trainer uses);
   diffusers loads each file (FluxPipeline.load_lora_weights) and its transformer output must equal
   `fluxtrain forward --lora` on the same file to 1e-5 relative (float32).
   diffusers' kohya reader assumes FLUX.1-dev's widths for single blocks' linear1 (3072/12288), so
   the kohya files of this tiny model hold the double blocks' modules and the single blocks'
   linear2; the diffusers-format file holds every target.
   A short standard-mode training run with --lora_format diffusers,kohya: its lora.safetensors and
   lora_kohya.safetensors give the same forward output, and diffusers reads lora.safetensors alike.
2. Text encoder: a peft LoRA on a tiny CLIP, converted by fluxtrain to kohya names (lora_te1_*,
   .alpha), loaded by diffusers into FluxPipeline's CLIP and by `fluxtrain encode`: the pooled
   output equals peft's own to 1e-5.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_forward_inputs import grid_ids  # noqa: E402

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.environ.get("FLUXTRAIN_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
TOL = 1e-5
RANK, ALPHA = 8, 4.0
DOUBLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"]
SINGLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"fluxtrain {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tiny_transformer(snap):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(os.path.join(snap, "transformer"))
    return model


def diffusers_lora(model, modules, path):
    """A LoRA as diffusers/peft write it (lora_A random, lora_B random), alpha in the header."""
    g = torch.Generator().manual_seed(3)
    named = dict(model.named_modules())
    sd = {}
    for m in modules:
        lin = named[m]
        sd[f"transformer.{m}.lora_A.weight"] = torch.randn(RANK, lin.in_features, generator=g) / RANK
        sd[f"transformer.{m}.lora_B.weight"] = torch.randn(lin.out_features, RANK, generator=g) * 0.05
    meta = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": modules}
    save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def inputs(tmp):
    B, N, T = 2, 4, 7
    g = torch.Generator().manual_seed(5)
    inp = {"img": torch.randn(B, N * N, 64, generator=g), "img_ids": grid_ids(N, N).float(),
           "txt": torch.randn(B, T, 32, generator=g), "txt_ids": torch.zeros(T, 3),
           "y": torch.randn(B, 16, generator=g), "timesteps": torch.rand(B, generator=g),
           "guidance": torch.full((B,), 3.5)}
    path = os.path.join(tmp, "in.safetensors")
    save_file(inp, path)
    return inp, path


def diffusers_output(snap, inp, lora_file):
    model = FluxTransformer2DModel.from_pretrained(os.path.join(snap, "transformer")).eval()
    if lora_file:
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model)
        pipe.load_lora_weights(lora_file)
    with torch.no_grad():
        return model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                     timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"],
                     guidance=inp["guidance"], return_dict=False)[0]


def fluxtrain_output(snap, inputs_path, lora_file, tmp):
    out = os.path.join(tmp, "out.safetensors")
    args = ["forward", "--pretrained_model_name_or_path", snap, "--inputs", inputs_path, "--output", out]
    run(*args, *(["--lora", lora_file] if lora_file else []))
    return load_file(out)["output"]


def check_transformer(tmp):
    snap = os.path.join(tmp, "snap")
    model = tiny_transformer(snap)
    inp, inputs_path = inputs(tmp)
    base = diffusers_output(snap, inp, None)
    cases = {
        # name: (modules, formats to write)
        "every target": ([f"transformer_blocks.{i}.{t}" for i in range(2) for t in DOUBLE_TARGETS] +
                         [f"single_transformer_blocks.{i}.{t}" for i in range(2) for t in SINGLE_TARGETS],
                         ["diffusers"]),
        "double blocks": ([f"transformer_blocks.{i}.{t}" for i in range(2) for t in DOUBLE_TARGETS],
                          ["diffusers", "kohya"]),
        "single proj_out": ([f"single_transformer_blocks.{i}.proj_out" for i in range(2)], ["diffusers", "kohya"]),
    }
    worst = 0.0
    for name, (modules, formats) in cases.items():
        src = os.path.join(tmp, "src.safetensors")
        diffusers_lora(model, modules, src)
        for fmt in formats:
            ours = os.path.join(tmp, f"ours_{fmt}.safetensors")
            run("convert-lora", "--input", src, "--output", ours, "--to", fmt, "--model", snap)
            with safe_open(ours, "pt") as f:
                keys = list(f.keys())
                md = f.metadata()
            if fmt == "kohya":
                assert all(k.startswith("lora_unet_") for k in keys), keys[:3]
                assert any(k.endswith(".alpha") for k in keys)
            else:
                adapter = json.loads(md["lora_adapter_metadata"])
                assert adapter["transformer.r"] == RANK and adapter["transformer.lora_alpha"] == ALPHA, adapter
            ref = diffusers_output(snap, inp, ours)
            got = fluxtrain_output(snap, inputs_path, ours, tmp)
            e = rel(got, ref)
            effect = rel(ref, base)
            print(f"{name}, {fmt} file: diffusers vs fluxtrain forward {e:.2e} (LoRA changes the output by {effect:.1e})")
            assert effect > 1e-3, "the LoRA had no effect: the test would prove nothing"
            worst = max(worst, e)
        # The file diffusers itself wrote, read by fluxtrain: the same output.
        e = rel(fluxtrain_output(snap, inputs_path, src, tmp), diffusers_output(snap, inp, src))
        print(f"{name}, diffusers' own file in fluxtrain: {e:.2e}")
        worst = max(worst, e)
    return worst


def check_trainer_files(tmp):
    """`fluxtrain train --lora_format diffusers,kohya` in standard mode (rank 8, alpha 4): the files
    it writes give the same `forward` output, and diffusers reads lora.safetensors the same way."""
    snap = os.path.join(tmp, "init")
    run("init-model", "--size", "tiny", "--output_dir", snap)
    run("synth-data", "--output", os.path.join(tmp, "data.h5"), "--size", "tiny", "--num_samples", "4",
        "--sizes", "8", "--cond_latent_size", "8", "--text_len", "4")
    out = os.path.join(tmp, "run")
    run("train", "--pretrained_model_name_or_path", snap, "--train_data", os.path.join(tmp, "data.h5"),
        "--output_dir", out, "--device", "cpu", "--mixed_precision", "no", "--lora_mode", "standard",
        "--ranks", str(RANK), "--network_alphas", str(ALPHA), "--lora_format", "diffusers,kohya",
        "--lora_targets", "to_q,to_k,to_v,to_out.0,proj_mlp,proj_out", "--learning_rate", "3e-2",
        "--max_train_steps", "2", "--train_batch_size", "2", "--cond_size", "64", "--noise_size", "64",
        "--validation_steps", "0", "--report_to", "none", "--seed", "2")
    files = sorted(os.listdir(out))
    assert "lora.safetensors" in files and "lora_kohya.safetensors" in files, files
    assert "lora_diffusers.safetensors" not in files, "the native format is written once, as lora.safetensors"
    inp, inputs_path = inputs(tmp)
    native = fluxtrain_output(snap, inputs_path, os.path.join(out, "lora.safetensors"), tmp)
    kohya = fluxtrain_output(snap, inputs_path, os.path.join(out, "lora_kohya.safetensors"), tmp)
    ref = diffusers_output(snap, inp, os.path.join(out, "lora.safetensors"))
    base = diffusers_output(snap, inp, None)
    e_k, e_d = rel(kohya, native), rel(native, ref)
    print(f"trainer's files: kohya vs diffusers-format file in fluxtrain forward {e_k:.2e}; "
          f"diffusers vs fluxtrain forward {e_d:.2e} (LoRA changes the output by {rel(ref, base):.1e})")
    assert rel(ref, base) > 1e-4, "the trained LoRA had no effect: the test would prove nothing"
    return max(e_k, e_d)


def check_text_encoder(tmp):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from test_text_encoders import TOK, check_diffusers_loads, tiny_models, write_prompts
    from transformers import CLIPTokenizer

    snap = os.path.join(tmp, "te_snap")
    os.makedirs(os.path.join(snap, "tokenizer"))
    os.makedirs(os.path.join(snap, "tokenizer_2"))
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOK, "clip", f), os.path.join(snap, "tokenizer", f))
    shutil.copy(os.path.join(TOK, "t5", "spiece.model"), os.path.join(snap, "tokenizer_2", "spiece.model"))
    clip, _ = tiny_models(snap, 49407)
    prompts = ["a photo of a cat", "sks dog in a bucket", "x"]
    pf = os.path.join(tmp, "prompts.txt")
    write_prompts(pf, prompts)
    clip_ids = CLIPTokenizer.from_pretrained(os.path.join(snap, "tokenizer"))(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        base = clip(clip_ids).pooler_output
    torch.manual_seed(1)
    # alpha 6 at rank 4: a scale (1.5) that is not a power of two, so a lost alpha cannot hide.
    pc = get_peft_model(clip, LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])).eval()
    with torch.no_grad():
        ref = pc(clip_ids).pooler_output
    sd = {"text_encoder." + k[len("base_model.model."):]: v.contiguous() for k, v in get_peft_model_state_dict(pc).items()}
    src = os.path.join(tmp, "te_src.safetensors")
    assert rel(ref, base) > 1e-3, "the LoRA had no effect: the test would prove nothing"
    save_file(sd, src, metadata={"lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 6})})
    kohya = os.path.join(tmp, "te_kohya.safetensors")
    run("convert-lora", "--input", src, "--output", kohya, "--to", "kohya")
    keys = list(load_file(kohya))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys, keys[:4]
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha" in keys, keys[:4]
    assert load_file(kohya)["lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha"].item() == 6.0
    # fluxtrain reads its kohya file back ...
    out = os.path.join(tmp, "enc.safetensors")
    run("encode", "--pretrained_model_name_or_path", snap, "--prompts", pf, "--output", out,
        "--max_sequence_length", "16", "--text_encoder_lora", kohya)
    e1 = rel(load_file(out)["pooled_prompt_embeds"], ref)
    print(f"text encoder: fluxtrain encode with the kohya file vs peft: pooled {e1:.2e}")
    # ... and so does diffusers (alpha 6 / rank 4 from .alpha).
    check_diffusers_loads(snap, kohya, clip_ids, ref)
    return e1


def main():
    with tempfile.TemporaryDirectory() as tmp:
        errs = [check_transformer(tmp), check_trainer_files(tmp), check_text_encoder(tmp)]
    if max(errs) > TOL:
        print(f"FAIL: max relative error {max(errs):.2e} > {TOL}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
