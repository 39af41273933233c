"""`fluxtrain sample` applies the text-encoder LoRA a run trained (src/cli/cli_sample.cpp).

A tiny CPU run trains a plain (standard-mode) LoRA and a CLIP LoRA (--train_text_encoder_one_only) with validation pictures; the
picture drawn by `sample` with the run's two files (lora.safetensors and
text_encoder_lora.safetensors), the same prompt, seed, size, steps and guidance equals the run's last validation picture pixel for pixel (the validation sampler is the same
code: an end-to-end check that sample sees everything training saw). Without the text-encoder
file the picture differs (the CLIP LoRA has an effect), and a kohya file holding both parts
(--lora_format kohya: lora_unet_* and lora_te1_*) gives the same picture through --lora alone.
A --text_encoder_lora file without text-encoder keys is one line naming the flag, exit 2."""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

BIN = os.environ["FLUXTRAIN_BIN"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, expect=0):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if r.returncode != expect:
        sys.exit(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def main():
    tmp = tempfile.mkdtemp(prefix="fluxtrain-sample-te-")
    try:
        model, data, out = (os.path.join(tmp, n) for n in ("model", "data.h5", "out"))
        run([BIN, "init-model", "--size", "tiny", "--output_dir", model])
        run([BIN, "synth-data", "--output", data, "--num_samples", "4", "--sizes", "8", "--cond_latent_size", "8",
])
        prompt = "a blue square"
        run([BIN, "train", "--pretrained_model_name_or_path", model, "--train_data", data, "--output_dir", out,
             "--device", "cpu", "--mixed_precision", "no", "--num_threads", "1", "--train_text_encoder_one_only",
             "--text_encoder_lr", "3e-2", "--learning_rate", "3e-2", "--ranks", "4", "--network_alphas", "4",
             "--train_batch_size", "2", "--cond_size", "64", "--noise_size", "64", "--max_train_steps", "3",
             "--validation_steps", "3", "--validation_prompt", prompt, "--num_validation_images", "1",
             "--validation_inference_steps", "2", "--test_h", "64", "--test_w", "48",
             "--lora_mode", "standard", "--lora_format", "kohya", "--report_to", "none", "--seed", "7"])
        val = np.asarray(Image.open(os.path.join(out, "validation", "step-000003-00.png")))

        def sample(name, *lora):
            p = os.path.join(tmp, name)
            run([BIN, "sample", "--pretrained_model_name_or_path", model, "--prompt", prompt, "--output", p,
                 "--device", "cpu", "--dtype", "f32", "--height", "64", "--width", "48", "--num_inference_steps", "2",
                 "--seed", "7", *lora])
            return np.asarray(Image.open(p))

        both = sample("both.png", "--lora", os.path.join(out, "lora.safetensors"), "--text_encoder_lora",
                      os.path.join(out, "text_encoder_lora.safetensors"))
        only = sample("transformer_only.png", "--lora", os.path.join(out, "lora.safetensors"))
        kohya = sample("kohya.png", "--lora", os.path.join(out, "lora_kohya.safetensors"))
        assert np.array_equal(both, val), f"sample differs from the validation picture by {np.abs(both.astype(int) - val).max()}"
        assert not np.array_equal(both, only), "the text-encoder LoRA changed nothing: the test would prove nothing"
        assert np.abs(kohya.astype(int) - both.astype(int)).max() <= 1, "kohya file (both parts) differs"
        r = run([BIN, "sample", "--pretrained_model_name_or_path", model, "--prompt", prompt, "--output",
                 os.path.join(tmp, "x.png"), "--device", "cpu", "--text_encoder_lora",
                 os.path.join(out, "lora.safetensors")], expect=2)
        line = r.stderr.strip().splitlines()[-1]
        assert "--text_encoder_lora" in line and "no text encoder LoRA" in line, line
        print("sample: the run's last validation picture reproduced with both LoRA files; "
              "without the text-encoder file it differs; the kohya file gives the same picture")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
