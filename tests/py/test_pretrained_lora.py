"""--pretrained_lora_path (EasyControl's train.py flag): a run starts from a LoRA file in any format
fluxtrain reads. With --learning_rate 1e-30 (no representable change) the LoRA written at the end equals the one given, bit for
bit (easycontrol file, and a standard-mode LoRA given in kohya keys via convert-lora); a file whose
alpha differs from --network_alphas, or whose adapters differ from the options, is one line naming
the flag, exit 2."""
import os
import shutil
import subprocess
import sys
import tempfile

from safetensors.torch import load_file

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, expect=0):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if r.returncode != expect:
        sys.exit(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def train(model, data, out, *extra):
    return [BIN, "train", "--config", os.path.join(SRC, "configs", "tiny-cpu.ini"), "--pretrained_model_name_or_path",
            model, "--train_data", data, "--output_dir", out, "--num_threads", "1", "--validation_steps", "0",
            "--cond_size", "64", "--noise_size", "64", *extra]


def same(a, b):
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y), (sorted(x)[:3], sorted(y)[:3])
    for k in x:
        assert x[k].dtype == y[k].dtype and (x[k] == y[k]).all(), k


def main():
    tmp = tempfile.mkdtemp(prefix="fluxtrain-pretrained-lora-")
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.h5")
        run([BIN, "init-model", "--size", "tiny", "--output_dir", model])
        run([BIN, "synth-data", "--output", data, "--num_samples", "8", "--sizes", "8", "--cond_latent_size", "8"])
        # EasyControl mode: 3 updates, then a run from that file at lr 0.
        run(train(model, data, os.path.join(tmp, "a"), "--max_train_steps", "3"))
        first = os.path.join(tmp, "a", "lora.safetensors")
        run(train(model, data, os.path.join(tmp, "b"), "--max_train_steps", "1", "--learning_rate", "1e-30",
                  "--pretrained_lora_path", first))
        same(first, os.path.join(tmp, "b", "lora.safetensors"))
        # Another alpha: refused.
        r = run(train(model, data, os.path.join(tmp, "c"), "--max_train_steps", "1", "--network_alphas", "8",
                      "--pretrained_lora_path", first), expect=2)
        assert "--pretrained_lora_path" in r.stderr and "alpha" in r.stderr, r.stderr
        # Another rank: refused by the strict loader.
        r = run(train(model, data, os.path.join(tmp, "d"), "--max_train_steps", "1", "--ranks", "8",
                      "--network_alphas", "8", "--pretrained_lora_path", first), expect=2)
        assert "--pretrained_lora_path" in r.stderr, r.stderr
        # Standard mode from a kohya file.
        std = ["--lora_mode", "standard", "--ranks", "4", "--network_alphas", "2"]
        run(train(model, data, os.path.join(tmp, "e"), "--max_train_steps", "2", *std))
        kohya = os.path.join(tmp, "e_kohya.safetensors")
        run([BIN, "convert-lora", "--input", os.path.join(tmp, "e", "lora.safetensors"), "--output", kohya,
             "--to", "kohya", "--model", model])
        run(train(model, data, os.path.join(tmp, "f"), "--max_train_steps", "1", "--learning_rate", "1e-30",
                  "--pretrained_lora_path", kohya, *std))
        same(os.path.join(tmp, "e", "lora.safetensors"), os.path.join(tmp, "f", "lora.safetensors"))
        print("--pretrained_lora_path: easycontrol and kohya files start a run bit-exactly; mismatches refused")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
