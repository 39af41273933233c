"""Text encoders against the implementations users run today (transformers, peft, diffusers).

1. Tokenizers: transformers' CLIPTokenizer and T5Tokenizer, built from the same FLUX tokenizer
   files, on a few hundred generated strings (accents, CJK, emoji, punctuation runs, odd
   whitespace, contractions, special-token literals, long captions, empty), padded and truncated
   as FLUX does (77 / max_sequence_length): fluxtrain's ids (`fluxtrain encode --tokenize_only`)
   must be equal, exactly.
2. Models: a tiny random CLIPTextModel and T5EncoderModel saved with save_pretrained (T5 sharded
   with an index) and run by `fluxtrain encode`: pooled output and T5 hidden states equal to 1e-5
   relative (float32), for both of CLIP's pooling rules.
3. LoRA: peft adapters on the same targets (CLIP q/k/v/out_proj, T5 q/k/v/o, random B) read by
   fluxtrain from the diffusers layout and from peft's own naming: equal again, 1e-5.
4. diffusers' FluxPipeline.load_lora_weights accepts the text-encoder LoRA file fluxtrain writes,
   and the pipeline's CLIP then gives fluxtrain's pooled output (1e-5).
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.environ.get("FLUXTRAIN_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
TOK = os.path.join(SRC, "tests", "data", "tokenizers")
TOL = 1e-5
T5_LEN = 160  # past T5's max_distance 128: the clamped buckets take part

torch.manual_seed(0)
random.seed(0)


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"fluxtrain {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def write_prompts(path, prompts):
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(p.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") + "\n")


def generated_strings(n=300):
    words = ["a", "photo", "of", "the", "cat", "dog", "sks", "portrait", "Oil", "PAINTING", "8k", "HDR", "3.14",
             "1920s", "don't", "it's", "WE'LL", "they're", "I'd", "you've", "I'm", "o'clock", "rock'n'roll"]
    accents = ["café", "naïve", "Crème brûlée", "ÅNGSTRÖM", "Straße", "İstanbul", "ΣΟΦΙΑ σοφία", "Ærøskøbing",
               "e\u0301te\u0301", "Ñandú", "Łódź", "Việt Nam", "mañana"]
    cjk = ["中文字符", "日本語のテキスト", "한국어 문장", "東京タワー", "漢字かなカナ", "ｆｕｌｌｗｉｄｔｈ"]
    emoji = ["🐱", "👨‍👩‍👧", "🇫🇷", "❤️", "🎨🖌️", "👍🏽", "✨✨"]
    punct = ["!!!", "...", "?!?!", "'''s", "--", "(((", ")))", "@#$%", "“quoted”", "«guillemets»", "—", "&amp;",
             "'", "''ll", "!'s", "~*~", "\\", "/", "_", "¿¡"]
    spaces = [" ", "  ", "\t", "\n", " \n ", "\u00a0", "\u3000", "\u2003", "\u200b", "\u2028", "\u180e", "\u0085",
              "\x0b", "\x0c"]
    specials = ["<|endoftext|>", "<|startoftext|>", "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_42>"]
    pools = [words] * 6 + [accents, cjk, emoji, punct, punct]
    out = ["", " ", "a", "A", "\t\n", "<|endoftext|>", "</s>", "a photo of a cat", "x" * 300]
    while len(out) < n:
        k = random.choice([1, 2, 3, 5, 8, 13, 40, 120])
        toks = []
        for _ in range(k):
            toks.append(random.choice(random.choice(pools)))
            toks.append(random.choice(spaces) if random.random() < 0.2 else (" " if random.random() < 0.8 else ""))
        if random.random() < 0.05:
            toks.insert(random.randrange(len(toks) + 1), random.choice(specials))
        out.append("".join(toks))
    long = " ".join(random.choice(words) for _ in range(700))  # > 77 CLIP and > 512 T5 tokens
    out += [long, long.upper(), "a " * 600]
    return out


def check_tokenizers(tmp):
    from transformers import CLIPTokenizer, T5Tokenizer

    snap = os.path.join(tmp, "tok_snapshot")
    os.makedirs(os.path.join(snap, "tokenizer"))
    os.makedirs(os.path.join(snap, "tokenizer_2"))
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOK, "clip", f), os.path.join(snap, "tokenizer", f))
    shutil.copy(os.path.join(TOK, "t5", "spiece.model"), os.path.join(snap, "tokenizer_2", "spiece.model"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(snap, "tokenizer"))
    t5_tok = T5Tokenizer.from_pretrained(os.path.join(snap, "tokenizer_2"))
    prompts = generated_strings()
    prompts_file = os.path.join(tmp, "gen_prompts.txt")
    write_prompts(prompts_file, prompts)
    out = os.path.join(tmp, "ids.safetensors")
    for L in (512, 77):
        run("encode", "--pretrained_model_name_or_path", snap, "--prompts", prompts_file, "--output", out,
            "--tokenize_only", "--max_sequence_length", str(L))
        got = load_file(out)
        assert got["clip_input_ids"].shape == (len(prompts), 77), got["clip_input_ids"].shape
        assert got["t5_input_ids"].shape == (len(prompts), L)
        ref_c = clip_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ref_t = t5_tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
        bad = [(i, p) for i, p in enumerate(prompts) if not torch.equal(got["clip_input_ids"][i], ref_c[i])]
        bad_t = [(i, p) for i, p in enumerate(prompts) if not torch.equal(got["t5_input_ids"][i], ref_t[i])]
        for i, p in bad[:5]:
            print("CLIP mismatch", repr(p), got["clip_input_ids"][i][:20].tolist(), ref_c[i][:20].tolist())
        for i, p in bad_t[:5]:
            print("T5 mismatch", repr(p), got["t5_input_ids"][i][:20].tolist(), ref_t[i][:20].tolist())
        assert not bad and not bad_t, f"{len(bad)} CLIP and {len(bad_t)} T5 of {len(prompts)} strings differ"
    print(f"tokenizers: {len(prompts)} strings, CLIP and T5 ids equal to transformers (T5 at 512 and 77)")
    return snap, clip_tok, t5_tok


def tiny_models(snap, eos_token_id):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                        eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    with torch.no_grad():  # livelier than the default init, so that differences show
        for p in list(clip.parameters()) + list(t5.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    clip.save_pretrained(os.path.join(snap, "text_encoder"))
    t5.save_pretrained(os.path.join(snap, "text_encoder_2"), max_shard_size="400KB")
    assert os.path.exists(os.path.join(snap, "text_encoder_2", "model.safetensors.index.json")), "T5 not sharded"
    return clip, t5


def reference(clip, t5, clip_ids, t5_ids):
    with torch.no_grad():
        return clip(clip_ids).pooler_output, t5(t5_ids).last_hidden_state


def encode(snap, prompts_file, out, *extra):
    run("encode", "--pretrained_model_name_or_path", snap, "--prompts", prompts_file, "--output", out,
        "--max_sequence_length", str(T5_LEN), "--batch_size", "5", *extra)
    return load_file(out)


def peft_wrap(clip, t5, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pc = get_peft_model(clip, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    pt = get_peft_model(t5, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q", "k", "v", "o"]))
    return pc.eval(), pt.eval()


def lora_keys(model, prefix):
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {prefix + k[len("base_model.model."):]: v.contiguous() for k, v in sd.items()}, sd


def main():
    with tempfile.TemporaryDirectory() as tmp:
        snap, clip_tok, t5_tok = check_tokenizers(tmp)
        prompts = ["a photo of a cat", "", "An oil painting of a red fox, trending on artstation, 8k",
                   "中文 café 🐱!!!", " ".join(["long caption"] * 90), "sks dog\tin a bucket\nat night", "x"]
        pf = os.path.join(tmp, "prompts.txt")
        write_prompts(pf, prompts)
        clip_ids = clip_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t5_ids = t5_tok(prompts, padding="max_length", max_length=T5_LEN, truncation=True,
                        return_tensors="pt").input_ids
        out = os.path.join(tmp, "out.safetensors")
        for eos in (2, 49407):  # legacy rule (argmax of ids) and first-EOS rule
            clip, t5 = tiny_models(snap, eos)
            ref_p, ref_h = reference(clip, t5, clip_ids, t5_ids)
            for ckpt in ([], ["--gradient_checkpointing"]):
                got = encode(snap, pf, out, *ckpt)
                assert torch.equal(got["clip_input_ids"], clip_ids) and torch.equal(got["t5_input_ids"], t5_ids)
                assert got["pooled_prompt_embeds"].shape == (len(prompts), 32)
                assert got["prompt_embeds"].shape == (len(prompts), T5_LEN, 32)
                ep, eh = rel(got["pooled_prompt_embeds"], ref_p), rel(got["prompt_embeds"], ref_h)
                print(f"models (eos_token_id {eos}{', checkpointing' if ckpt else ''}): pooled {ep:.2e}, "
                      f"T5 states {eh:.2e}")
                assert ep < TOL and eh < TOL

        # LoRA through peft on the same targets.
        base_p, _ = reference(clip, t5, clip_ids, t5_ids)
        pc, pt = peft_wrap(clip, t5, 1)
        ref_p, ref_h = reference(pc, pt, clip_ids, t5_ids)
        sd_c, peft_c = lora_keys(pc, "text_encoder.")
        sd_t, _ = lora_keys(pt, "text_encoder_2.")
        lora_file = os.path.join(tmp, "te_lora.safetensors")
        meta = {"text_encoder.r": 4, "text_encoder.lora_alpha": 8, "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 8}
        save_file({**sd_c, **sd_t}, lora_file, metadata={"lora_adapter_metadata": json.dumps(meta)})
        ours = os.path.join(tmp, "ours_lora.safetensors")
        got = encode(snap, pf, out, "--text_encoder_lora", lora_file, "--save_text_encoder_lora", ours)
        ep, eh = rel(got["pooled_prompt_embeds"], ref_p), rel(got["prompt_embeds"], ref_h)
        print(f"peft LoRA (diffusers keys): pooled {ep:.2e}, T5 states {eh:.2e}")
        assert ep < TOL and eh < TOL
        assert rel(got["pooled_prompt_embeds"], base_p) > 1e-3, "LoRA had no effect: test would prove nothing"
        # peft's own naming (CLIP only), alpha from the command line.
        peft_file = os.path.join(tmp, "peft_clip.safetensors")
        save_file({k: v.contiguous() for k, v in peft_c.items()}, peft_file)
        got = encode(snap, pf, out, "--text_encoder_lora", peft_file, "--text_encoder_alpha", "8")
        ep = rel(got["pooled_prompt_embeds"], ref_p)
        print(f"peft LoRA (peft keys, CLIP only): pooled {ep:.2e}")
        assert ep < TOL

        # diffusers reads the file fluxtrain wrote into FluxPipeline's CLIP.
        check_diffusers_loads(snap, ours, clip_ids, ref_p)
        check_init_model_tiny(tmp, pf, clip_ids, t5_ids)


def check_init_model_tiny(tmp, prompts_file, clip_ids, t5_ids):
    """The tiny encoders init-model writes load in transformers and give fluxtrain's outputs."""
    from transformers import CLIPTextModel, T5EncoderModel

    snap = os.path.join(tmp, "tiny")
    run("init-model", "--size", "tiny", "--output_dir", snap, "--seed", "3")
    got = encode(snap, prompts_file, os.path.join(tmp, "tiny_out.safetensors"))
    clip = CLIPTextModel.from_pretrained(os.path.join(snap, "text_encoder")).eval()
    t5 = T5EncoderModel.from_pretrained(os.path.join(snap, "text_encoder_2")).eval()
    ref_p, ref_h = reference(clip, t5, clip_ids, t5_ids)
    ep, eh = rel(got["pooled_prompt_embeds"], ref_p), rel(got["prompt_embeds"], ref_h)
    print(f"init-model tiny encoders in transformers: pooled {ep:.2e}, T5 states {eh:.2e}")
    assert ep < TOL and eh < TOL


def check_diffusers_loads(snap, lora_path, clip_ids, ref_pooled):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    text_encoder = CLIPTextModel.from_pretrained(os.path.join(snap, "text_encoder")).eval()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(snap, "tokenizer")),
                        text_encoder_2=T5EncoderModel.from_pretrained(os.path.join(snap, "text_encoder_2")),
                        tokenizer_2=T5Tokenizer.from_pretrained(os.path.join(snap, "tokenizer_2")),
                        transformer=transformer)
    pipe.load_lora_weights(lora_path)
    with torch.no_grad():
        p = pipe.text_encoder(clip_ids).pooler_output
    e = rel(p, ref_pooled)
    print(f"diffusers FluxPipeline.load_lora_weights(fluxtrain's file): pooled {e:.2e}")
    assert e < TOL


if __name__ == "__main__":
    main()
    print("OK")
