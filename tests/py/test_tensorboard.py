"""TensorBoard event files written by `fluxtrain train`, read by the tensorboard package itself.

1. A tiny training run (configs/tiny-cpu.ini on init-model's tiny transformer and synth-data)
   writes output_dir/logs/events.out.tfevents.*: EventAccumulator finds the scalars of
   metrics.jsonl (loss, lr, grad_norm, s_per_step, ...) at the same steps with the same values
   (float32), and the test-pattern image of --debug_tensorboard_image as a PNG with the pixels
   fluxtrain put in.
2. A run that crashes after the checkpoint and resumes opens new event files in the same folder;
   the series continue, and what the crashed run logged after its checkpoint is dropped (so the
   scalars equal metrics.jsonl again).
3. An event file cut in the middle of a record still reads up to the last whole record.
"""
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.environ.get("FLUXTRAIN_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"fluxtrain {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def accumulate(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def pattern(step):
    """The test image the trainer writes (src/train/trainer.cpp, --debug_tensorboard_image)."""
    return ((np.arange(24 * 32 * 3).reshape(24, 32, 3) * 7 + step) % 256).astype(np.uint8)


def train(tmp, out, steps, *extra, fail=False):
    args = ["train", "--config", os.path.join(SRC, "configs", "tiny-cpu.ini"),
            "--pretrained_model_name_or_path", os.path.join(tmp, "model"), "--train_data", os.path.join(tmp, "data.h5"),
            "--output_dir", out, "--max_train_steps", str(steps), "--checkpointing_steps", "3",
            "--validation_steps", "2", "--validation_samples", "2", "--train_batch_size", "2", "--cond_size", "64",
            "--noise_size", "64", "--debug_tensorboard_image", *extra]
    if not fail:
        return run(*args)
    r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, "the injected failure did not happen"


def scalars_match_metrics(acc, out, keys, failures):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    for key in keys:
        want = [(m["step"], m[key]) for m in metrics
                if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        assert want, key
        if key not in acc.Tags()["scalars"]:
            failures.append(f"scalar {key} missing (have {acc.Tags()['scalars']})")
            continue
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        same = [s for s, _ in got] == [s for s, _ in want] and all(
            np.float32(v) == np.float32(w) for (_, v), (_, w) in zip(got, want))
        print(f"scalar {key}: steps {[s for s, _ in got]}, {'equal to' if same else 'DIFFERENT from'} metrics.jsonl")
        if not same:
            failures.append(f"scalar {key}: {got} vs {want}")


def main():
    from PIL import Image

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        run("init-model", "--size", "tiny", "--layout", "bfl", "--output_dir", os.path.join(tmp, "model"))
        run("synth-data", "--output", os.path.join(tmp, "data.h5"), "--size", "tiny", "--num_samples", "8",
            "--sizes", "8", "--cond_latent_size", "8", "--text_len", "4")
        out = os.path.join(tmp, "out")
        train(tmp, out, 3)
        files = sorted(glob.glob(os.path.join(out, "logs", "events.out.tfevents.*")))
        assert len(files) == 1, files
        acc = accumulate(os.path.join(out, "logs"))
        scalars_match_metrics(acc, out, ("loss", "lr", "grad_norm", "s_per_step", "val_loss"), failures)
        imgs = acc.Images("debug/pattern") if "debug/pattern" in acc.Tags()["images"] else []
        if [e.step for e in imgs] != [1, 2, 3]:
            failures.append(f"images at steps {[e.step for e in imgs]}, expected [1, 2, 3]")
        for e in imgs:
            px = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
            if (e.height, e.width) != (24, 32) or not np.array_equal(px, pattern(e.step)):
                failures.append(f"image at step {e.step}: {e.height}x{e.width}, pixels differ")
        print(f"images: {len(imgs)} PNGs at steps {[e.step for e in imgs]}")

        # A crash after step 4 (checkpoint at 3), then a resume to step 6: a second event file; step 4
        # of the crashed run is dropped (SessionLog START), the series equals metrics.jsonl.
        train(tmp, out, 6, "--resume_from_checkpoint", "latest", "--debug_fail_at_step", "4", fail=True)
        train(tmp, out, 6, "--resume_from_checkpoint", "latest")
        files = sorted(glob.glob(os.path.join(out, "logs", "events.out.tfevents.*")))
        print(f"after a crash and a resume: {len(files)} event files")
        if len(files) != 3:
            failures.append(f"resume: {len(files)} event files, expected 3")
        acc = accumulate(os.path.join(out, "logs"))
        scalars_match_metrics(acc, out, ("loss", "grad_norm"), failures)
        if [e.step for e in acc.Scalars("loss")] != [1, 2, 3, 4, 5, 6]:
            failures.append(f"resume: loss at steps {[e.step for e in acc.Scalars('loss')]}")

        # Truncation: cut the first file inside the record of step 3's scalars (the one before
        # the last, step 3's image): steps 1 and 2 must still read.
        cut = os.path.join(tmp, "cut")
        os.makedirs(cut)
        data = open(files[0], "rb").read()
        starts, at = [], 0
        while at < len(data):  # TFRecord framing: u64 length, u32 crc, data, u32 crc
            starts.append(at)
            at += 16 + int.from_bytes(data[at:at + 8], "little")
        assert at == len(data), "event file does not end on a record boundary"
        with open(os.path.join(cut, os.path.basename(files[0])), "wb") as f:
            f.write(data[:starts[-2] + 20])
        acc = accumulate(cut)
        part = [e.step for e in acc.Scalars("loss")] if "loss" in acc.Tags()["scalars"] else []
        print(f"truncated file ({len(starts)} records, cut inside record {len(starts) - 1}): loss at steps {part}")
        if part != [1, 2]:
            failures.append(f"truncated file: loss at steps {part}, expected [1, 2]")
    for f in failures:
        print("FAIL:", f)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
