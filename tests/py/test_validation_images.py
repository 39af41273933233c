"""Validation images during training (src/train/validation.h), end to end with `fluxtrain train` on
the tiny model (CPU, float32):
  - PNGs appear at the right steps (every --validation_steps and the last), named by step and
    image, listed in metrics.jsonl, with an EasyControl subject condition;
  - a resumed run continues the same series: its images at the last step equal the straight
    run's (pixel for pixel: resume is bit-identical);
  - spread over 2 ranks (image k on rank k mod 2), the pictures equal one process's within one
    level (data-parallel float32 sums differ in the last bits);
  - a condition count that does not match --lora_num is one line naming the flags, exit 2.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIEXEC = os.environ.get("MPIEXEC", "mpirun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def run(cmd, expect=0):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if r.returncode != expect:
        sys.exit(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def train_cmd(model, data, out, subject, *extra):
    return [BIN, "train", "--config", os.path.join(SRC, "configs", "tiny-cpu.ini"), "--pretrained_model_name_or_path",
            model, "--train_data", data, "--output_dir", out, "--num_threads", "1", "--train_batch_size", "2",
            "--cond_size", "64", "--noise_size", "64", "--checkpointing_steps", "2", "--validation_steps", "2",
            "--validation_prompt", "a red circle", "--num_validation_images", "3", "--validation_inference_steps", "2",
            "--test_h", "64", "--test_w", "48", "--subject_test_images", subject, *extra]


def images(out, step):
    d = os.path.join(out, "validation")
    names = sorted(n for n in os.listdir(d) if n.startswith(f"step-{step:06d}-"))
    return [np.asarray(Image.open(os.path.join(d, n))) for n in names]


def main():
    tmp = tempfile.mkdtemp(prefix="fluxtrain-validation-")
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.h5")
        run([BIN, "init-model", "--size", "tiny", "--output_dir", model])
        run([BIN, "synth-data", "--output", data, "--num_samples", "8", "--sizes", "8", "--cond_latent_size", "8",
             "--cond_kind", "subject"])
        subject = os.path.join(tmp, "subject.png")
        img = np.full((40, 56, 3), 255, np.uint8)
        img[8:32, 10:40] = (200, 30, 30)
        Image.fromarray(img).save(subject)

        # Straight run: 4 updates, images at steps 2 and 4.
        a = os.path.join(tmp, "a")
        run(train_cmd(model, data, a, subject, "--max_train_steps", "4"))
        files = sorted(os.listdir(os.path.join(a, "validation")))
        assert files == [f"step-{s:06d}-{k:02d}.png" for s in (2, 4) for k in range(3)], files
        for s in (2, 4):
            ims = images(a, s)
            assert all(im.shape == (64, 48, 3) and im.dtype == np.uint8 for im in ims), [im.shape for im in ims]
            # Fixed seeds per image index: three different pictures, not one repeated.
            assert not np.array_equal(ims[0], ims[1]) and not np.array_equal(ims[1], ims[2])
        metrics = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))]
        listed = {m["step"]: m["validation_images"] for m in metrics if "validation_images" in m}
        assert sorted(listed) == [2, 4] and all(len(v) == 3 for v in listed.values()), listed

        # Resumed run: 2 updates, then resume to 4: the same series, bit for bit.
        b = os.path.join(tmp, "b")
        run(train_cmd(model, data, b, subject, "--max_train_steps", "2"))
        run(train_cmd(model, data, b, subject, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
        for s in (2, 4):
            for x, y in zip(images(a, s), images(b, s)):
                assert np.array_equal(x, y), f"step {s}: resumed run's picture differs"

        # Two ranks (batch 1 each: the same global batch), images spread over them.
        c = os.path.join(tmp, "c")
        cmd = train_cmd(model, data, c, subject, "--max_train_steps", "4")
        cmd[cmd.index("--train_batch_size") + 1] = "1"
        run([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-np", "2", *cmd])
        for s in (2, 4):
            for x, y in zip(images(a, s), images(c, s)):
                d = np.abs(x.astype(int) - y.astype(int)).max()
                assert d <= 1, f"step {s}: 2 ranks differ from 1 by {d} levels"

        # Two condition images for a one-condition LoRA.
        r = run(train_cmd(model, data, os.path.join(tmp, "d"), subject, "--max_train_steps", "2",
                          "--spatial_test_images", subject), expect=2)
        line = r.stderr.strip().splitlines()[-1]
        assert "--lora_num 1" in line and "--subject_test_images" in line, line
        print("validation images: steps 2 and 4, resume continues the series, 2 ranks within 1 level")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
