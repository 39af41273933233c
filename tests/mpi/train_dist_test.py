#!/usr/bin/env python3
"""Distributed `fluxtrain train` end to end (issue 4), on the tiny model, float64, CPU, MPI.

Usage: train_dist_test.py data_parallel|resume|failure|text_encoders|online_encoding|sharded_streaming|block_major
Environment: FLUXTRAIN_BIN (the binary), MPIEXEC (mpirun).

  data_parallel  2 ranks x batch 1 (replicated and --shard_optimizer) for 5 updates, across an
                 epoch boundary, give the LoRA masters of 1 process x batch 2 (no mpirun: the MPI
                 singleton path) to 1e-10 relative; and 1 process with --shard_weights too, and
                 2 ranks with --shard_weights reading the diffusers layout block by block; and
                 with 2 gradient-accumulation steps (also with a non-finite first micro-batch on one
                 rank); the validation loss split over 2 and 4 ranks
                 (uneven shares, sharded weights) equals one process's; a non-finite loss on one
                 rank skips the update on all ranks; an unseeded run uses rank 0's seed on every rank.
  resume         a checkpoint written by 2 ranks x batch 2 resumes on 1 rank x batch 4 and on
                 4 ranks x batch 1 and ends where the uninterrupted 2-rank run ends (1e-10); a
                 resume with another global batch fails with a clear error, as does an
                 --encoder_process beyond the job's ranks.
  failure        rank 1 throws at step 3 of a 2-rank run: mpirun exits non-zero within 60 s,
                 stderr says "rank 1: injected failure at step 3"; resuming from the newest
                 checkpoint left behind finishes with the uninterrupted result.
  text_encoders  the three text-encoder modes (none, --train_text_encoder_one_only,
                 --train_text_encoder; tiny CLIP/T5 from the captions): 2 ranks (encoder on
                 --encoder_process 0, and 1: its LoRA travels to rank 0 for the checkpoint; also
                 with --shard_optimizer) and
                 4 ranks give the LoRA masters of both the transformer and the text encoders of one
                 process (1e-12; the encoders run only on the encoder process there: the start
                 line's per-rank encoder bytes are 0 elsewhere); 2 steps +
                 resume equal 4 straight steps bit for bit (1 process) and to 1e-12 (resumed on
                 2 ranks); with accumulation, validation and a skipped update too; the right
                 text-encoder LoRA is written and moved.
  online_encoding  a dataset of images (prepare without --cache_latents) trains like the same
                 images with cached latents (float64 autoencoder both ways, latents rounded to
                 float32 both ways: LoRA 1e-10); the same on 2 ranks (autoencoder and frozen text encoders on the encoder
                 process only) equals one process (1e-12); a dataset whose text embeddings were
                 cached by `prepare --cache_text_embeddings` trains like the captions encoded online
                 by the frozen encoders (embeddings stored as float32: LoRA 1e-6, losses 1e-7);
                 data_wait_ms is in metrics.jsonl.
  sharded_streaming  2 ranks with --shard_weights and --blocks_to_swap (each rank streams its
                 shard from host memory) write the same LoRA file, bit for bit, as without
                 --blocks_to_swap; also with fp8 blocks, with every block streamed and
                 checkpointing, and with gradient accumulation.
  block_major    --block_major_accumulation (2 and 3 micro-batches per update) gives the ordinary
                 order's LoRA masters (1e-12): one process, 2 ranks with sharded streamed weights,
                 one process training both text encoders; refused with one line under mpirun
                 with a text-encoder LoRA on the encoder process.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

BIN = os.environ["FLUXTRAIN_BIN"]
MPIEXEC = os.environ.get("MPIEXEC", "mpirun")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
TOL = 1e-10  # float64 throughout; only the summation order differs between rank counts

TMP = tempfile.mkdtemp(prefix="fluxtrain_dist_")
MODEL = os.path.join(TMP, "model")
DATA = os.path.join(TMP, "data.h5")


def run(cmd, expect_ok=True, timeout=int(os.environ.get("RUN_TIMEOUT", "120"))):
    # Own process group: a job that hangs (ranks out of step in a collective) is killed whole,
    # and reported as a failure instead of stalling ctest.
    t0 = time.time()
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        sys.exit(f"FAILED (hung for {timeout} s): {' '.join(cmd)}")
    dt = time.time() - t0
    res = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if expect_ok and p.returncode != 0:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}")
    return res, dt


def setup():
    # Both layouts: "auto" picks the BFL file; one case reads the diffusers folder instead.
    run([BIN, "init-model", "--size", "tiny", "--layout", "both", "--max_shard_size_mb", "0.1",
         "--output_dir", MODEL])
    run([BIN, "synth-data", "--output", DATA, "--size", "tiny", "--num_samples", "8", "--sizes", "8",
         "--cond_latent_size", "8", "--text_len", "4"])


def flags(out, batch, steps, extra=(), seed=True):
    f = base_flags(out, batch, steps)
    if not seed:
        i = f.index("--seed")
        del f[i:i + 2]
    for opt in [e for e in extra if e.startswith("--") and e in f]:  # extra overrides a default
        i = f.index(opt)
        del f[i:i + 2]
    return f + list(extra)


def base_flags(out, batch, steps):
    return ["--pretrained_model_name_or_path", MODEL, "--train_data", DATA, "--output_dir", out,
            "--mixed_precision", "no", "--device", "cpu", "--debug_float64", "--debug_save_masters",
            "--ranks", "4", "--network_alphas", "4", "--cond_size", "64", "--noise_size", "64",
            "--seed", "5", "--validation_steps", "0", "--learning_rate", "1e-3",
            "--max_grad_norm", "0.05",  # small: clipping by the global norm is active
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--num_threads", "1",
            "--prefetch_batches", "1", "--train_batch_size", str(batch), "--max_train_steps", str(steps)]


def train(np_, out, batch, steps, extra=(), expect_ok=True, seed=True):
    f = flags(out, batch, steps, extra, seed)
    cmd = [BIN, "train", *f]
    if np_ > 0:  # 0: no mpirun at all (MPI singleton)
        cmd = [MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-np", str(np_), *cmd]
    return run(cmd, expect_ok)


def masters(out):
    return load_file(os.path.join(out, "lora_masters.safetensors"))


def compare(name, ref, got, tol=TOL, files=("lora_masters.safetensors",)):
    for f in files:
        compare_file(f"{name} [{f}]", os.path.join(ref, f), os.path.join(got, f), tol)


def compare_file(name, ref, got, tol):
    a, b = load_file(ref), load_file(got)
    assert a.keys() == b.keys(), f"{name}: different LoRA tensors"
    worst = 0.0
    for k in a:
        assert a[k].dtype == np.float64, f"{name}: {k} is {a[k].dtype}, expected float64 masters"
        scale = max(np.abs(a[k]).max(), 1e-30)
        worst = max(worst, float(np.abs(a[k] - b[k]).max() / scale))
    print(f"{name}: max relative difference {worst:.3e}")
    if not worst <= tol:
        sys.exit(f"FAILED: {name}: {worst:.3e} > {tol}")


def moved(ref_out):
    # "up" starts at zero: non-zero values show that training happened, so that equal results
    # between runs prove something.
    up = [v for k, v in masters(ref_out).items() if k.endswith(".up.weight") or k.endswith(".lora_B.weight")]
    assert up and max(float(np.abs(v).max()) for v in up) > 0, "LoRA up weights are still zero"


def data_parallel():
    ref = os.path.join(TMP, "ref")
    train(0, ref, 2, 5)
    moved(ref)
    for name, np_, extra in [("2 ranks x batch 1", 2, ()),
                             ("2 ranks x batch 1, --shard_optimizer", 2, ("--shard_optimizer",)),
                             ("1 process, --shard_weights --shard_optimizer", 0,
                              ("--shard_weights", "--shard_optimizer")),
                             # sharded ranks read the model block by block, converted per block
                             ("2 ranks x batch 1, --shard_weights, diffusers layout", 2,
                              ("--shard_weights", "--model_layout", "diffusers"))]:
        out = os.path.join(TMP, name.replace(" ", "_").replace(",", ""))
        train(np_, out, 1 if np_ == 2 else 2, 5, extra)
        compare(name, ref, out)
    # Gradient accumulation: averaging only on the last micro-batch of each window.
    acc = ("--gradient_accumulation_steps", "2")
    ref_acc = os.path.join(TMP, "ref_acc")
    train(0, ref_acc, 2, 3, acc)
    out = os.path.join(TMP, "acc_np2")
    train(2, out, 1, 3, acc)
    compare("2 ranks x batch 1 x 2 accumulation steps", ref_acc, out)
    # A non-finite loss in the first micro-batch of a window: that rank still computes the second
    # (its sharded-weight gathers are the other rank's too); the update is skipped on both.
    nan = ("--debug_nan_at_step", "1")
    train(0, os.path.join(TMP, "ref_acc_nan"), 2, 3, acc + nan + ("--debug_nan_rank", "0"))
    out = os.path.join(TMP, "acc_nan_np2")
    train(2, out, 1, 3, acc + nan + ("--debug_nan_rank", "1"))
    compare("2 ranks x 2 accumulation steps, non-finite first micro-batch on rank 1", os.path.join(TMP, "ref_acc_nan"),
            out)
    # Validation is split over the ranks (3 samples: uneven shares, with sharded weights every
    # rank still runs the same forwards) and gives the single-process value.
    val = ("--validation_steps", "2", "--validation_samples", "3")
    ref_val = os.path.join(TMP, "ref_val")
    train(0, ref_val, 4, 2, val)
    want = [json.loads(l)["val_loss"] for l in open(os.path.join(ref_val, "metrics.jsonl")) if "val_loss" in l]
    assert len(want) == 1 and np.isfinite(want[0]), want
    for np_, extra in [(2, ()), (4, ("--shard_weights",))]:
        out = os.path.join(TMP, f"val_np{np_}")
        train(np_, out, 4 // np_, 2, val + extra)
        got = [json.loads(l)["val_loss"] for l in open(os.path.join(out, "metrics.jsonl")) if "val_loss" in l]
        rel = abs(got[0] - want[0]) / abs(want[0])
        print(f"validation loss on {np_} ranks: {got[0]!r} vs {want[0]!r} (relative {rel:.1e})")
        assert rel <= TOL, f"FAILED: validation loss on {np_} ranks differs by {rel:.1e}"
    # A non-finite loss on one rank skips the update on every rank: the same result as one
    # process whose whole update was non-finite (without the agreement the ranks would diverge).
    nan_ref = os.path.join(TMP, "nan_ref")
    train(0, nan_ref, 2, 5, ("--debug_nan_at_step", "2", "--debug_nan_rank", "0"))
    out = os.path.join(TMP, "nan_np2")
    train(2, out, 1, 5, ("--debug_nan_at_step", "2", "--debug_nan_rank", "1"))
    compare("non-finite loss on rank 1 of 2 at step 2", nan_ref, out)
    skipped = [json.loads(l)["skipped"] for l in open(os.path.join(out, "metrics.jsonl"))]
    assert skipped == [False, False, True, False, False, False], skipped
    # Without --seed every rank draws one; rank 0's must win (same LoRA init, data, noise).
    out = os.path.join(TMP, "unseeded_np2")
    train(2, out, 1, 2, seed=False)
    seed = json.load(open(os.path.join(out, "config.json")))["train"]["seed"]
    seeded = os.path.join(TMP, "seeded_np0")
    train(0, seeded, 2, 2, ("--seed", str(seed)), seed=False)
    compare(f"unseeded 2-rank run vs 1 process with its seed {seed}", seeded, out)
    # Only rank 0 writes: one metrics line per update, not one per rank.
    lines = open(os.path.join(TMP, "2_ranks_x_batch_1", "metrics.jsonl")).read().splitlines()
    assert len(lines) == 5, f"metrics.jsonl has {len(lines)} lines, expected 5"


def resume():
    ref = os.path.join(TMP, "ref2")
    train(2, ref, 2, 4, ("--checkpointing_steps", "2"))
    moved(ref)
    ck = os.path.join(ref, "checkpoint-2.h5")
    assert os.path.exists(ck), os.listdir(ref)
    for np_, batch in [(0, 4), (4, 1)]:
        out = os.path.join(TMP, f"resume_np{np_}")
        os.makedirs(out)
        shutil.copy(ck, out)
        train(np_, out, batch, 4, ("--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
        compare(f"2-rank checkpoint resumed on {max(np_, 1)} rank(s) x batch {batch}", ref, out)
    bad = os.path.join(TMP, "resume_bad")
    os.makedirs(bad)
    shutil.copy(ck, bad)
    p, _ = train(0, bad, 2, 4, ("--resume_from_checkpoint", "latest"), expect_ok=False)
    assert p.returncode != 0 and "global batch of 4" in p.stderr and "--train_batch_size 4" in p.stderr, p.stderr
    print("global batch mismatch:", p.stderr.strip().splitlines()[-1])
    # --encoder_process (old name --encoder_rank) must name an existing rank; on 2 ranks each names itself and the reason.
    p, _ = train(2, os.path.join(TMP, "enc"), 1, 2, ("--encoder_process", "2"), expect_ok=False)
    assert p.returncode != 0 and "--encoder_process 2: the job has 2 rank(s), 0..1" in p.stderr, p.stderr
    assert "rank 0: " in p.stderr or "rank 1: " in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(TMP, "enc")), "bad input must not create the output directory"


def failure():
    ref = os.path.join(TMP, "ref3")
    train(2, ref, 1, 5)
    out = os.path.join(TMP, "fail")
    p, dt = train(2, out, 1, 5, ("--checkpointing_steps", "1", "--debug_fail_at_step", "3",
                                 "--debug_fail_rank", "1"), expect_ok=False)
    print(f"failing job: exit {p.returncode} after {dt:.1f} s")
    assert p.returncode != 0, "mpirun exited 0 although rank 1 threw"
    assert dt < 60, f"the job took {dt:.1f} s to end"
    assert "rank 1: injected failure at step 3" in p.stderr, p.stderr
    left = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-") and f.endswith(".h5"))
    print("checkpoints left:", left)
    # Rank 0 saved checkpoint 2 before the step-3 collectives that rank 1 needed to reach the
    # failure, so it is complete whatever happened to checkpoint 3.
    assert "checkpoint-2.h5" in left, left
    train(2, out, 1, 5, ("--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"))
    compare("resumed after the failure", ref, out)


TE_FLAGS = ("--max_sequence_length", "8", "--text_encoder_lr", "2e-3", "--text_encoder_rank", "2",
            "--text_encoder_alpha", "2")
TE_FILE = "text_encoder_lora.safetensors"
TE_TOL = 1e-12  # the encoder process vs one process: float64, only summation orders differ


def te_moved(out, want_t5):
    te = load_file(os.path.join(out, TE_FILE))
    clip = [k for k in te if k.startswith("text_encoder.")]
    t5 = [k for k in te if k.startswith("text_encoder_2.")]
    assert clip, f"{out}: no CLIP LoRA in {TE_FILE}"
    assert bool(t5) == want_t5, f"{out}: T5 LoRA tensors {len(t5)}, expected {'some' if want_t5 else 'none'}"
    for keys in (clip, t5):
        if keys:
            up = max(float(np.abs(te[k]).max()) for k in keys if ".lora_B." in k)
            assert up > 0, f"{out}: text-encoder lora_B still zero"
            assert all(te[k].dtype == np.float64 for k in keys), "expected float64 masters"


def text_encoders():
    for mode in ((), ("--train_text_encoder_one_only",), ("--train_text_encoder",)):
        name = mode[0][2:] if mode else "no_text_encoder"
        extra = TE_FLAGS + mode
        files = ("lora_masters.safetensors", TE_FILE) if mode else ("lora_masters.safetensors",)
        ref = os.path.join(TMP, f"te_ref_{name}")
        train(0, ref, 2, 4, extra + ("--checkpointing_steps", "2"))
        moved(ref)
        if mode:
            te_moved(ref, mode[0] == "--train_text_encoder")
        else:
            assert not os.path.exists(os.path.join(ref, TE_FILE))
        # Full mode also with the encoder on rank 1 (its LoRA travels to rank 0 for checkpoints)
        # and with --shard_optimizer (the transformer's AdamW sharded, the text encoders' not).
        layouts = [(0, ())]
        if mode and mode[0] == "--train_text_encoder":
            layouts += [(1, ()), (1, ("--shard_optimizer",))]
        for enc, more in layouts:
            out = os.path.join(TMP, f"te_np2_{name}_enc{enc}{'_sharded' if more else ''}")
            p, _ = train(2, out, 1, 4, extra + ("--checkpointing_steps", "2", "--encoder_process", str(enc)) + more)
            if mode:  # only the encoder process holds encoder weights
                line = [l for l in p.stderr.splitlines() if "encoder weights per rank (bytes): " in l]
                assert line, p.stderr
                held = [int(x) for x in line[0].split(": ")[-1].split(", ")]
                assert len(held) == 2 and held[enc] > 0 and held[1 - enc] == 0, line
                # ... and the same numbers in the run's first metrics record (JSON).
                first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
                assert first.get("encoder_weight_bytes_per_rank") == held, first
            compare(f"{name}: 2 ranks, encoder process {enc} {' '.join(more)}", ref, out, tol=TE_TOL, files=files)
        # Resume: 2 steps, then the rest from checkpoint-2, bit for bit in one process.
        for np_, batch in [(0, 2), (2, 1)]:
            out = os.path.join(TMP, f"te_resume_{name}_np{np_}")
            os.makedirs(out)
            shutil.copy(os.path.join(ref, "checkpoint-2.h5"), out)
            train(np_, out, batch, 4, extra + ("--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
            compare(f"{name}: resumed at step 2 on {max(np_, 1)} rank(s)", ref, out, tol=0.0 if np_ == 0 else TE_TOL,
                    files=files)
    # Gradient accumulation, validation split over the ranks (the encoder process serves every
    # rank's validation forwards) and an update skipped for a non-finite loss on the encoder
    # process in its first micro-batch: it still serves the other rank's second one.
    extra = TE_FLAGS + ("--train_text_encoder", "--gradient_accumulation_steps", "2", "--validation_steps", "2",
                        "--validation_samples", "3")
    ref = os.path.join(TMP, "te_ref_acc")
    train(0, ref, 2, 3, extra + ("--debug_nan_at_step", "1", "--debug_nan_rank", "0"))
    want = [(m["skipped"], m.get("val_loss")) for m in map(json.loads, open(os.path.join(ref, "metrics.jsonl")))]
    for enc in (0, 1):  # the non-finite rank is the encoder process, or the one it serves
        out = os.path.join(TMP, f"te_np2_acc_enc{enc}")
        train(2, out, 1, 3, extra + ("--encoder_process", str(enc), "--debug_nan_at_step", "1", "--debug_nan_rank", "1"))
        compare(f"train_text_encoder: 2 ranks, accumulation, validation, a skipped update (encoder {enc})", ref, out,
                tol=TE_TOL, files=("lora_masters.safetensors", TE_FILE))
        got = [(m["skipped"], m.get("val_loss")) for m in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]
        assert [w[0] for w in want] == [g[0] for g in got] and any(w[0] for w in want), (want, got)
        for (_, a), (_, b) in zip(want, got):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= TE_TOL * abs(a)), (want, got)
    # 4 ranks, the encoder process last: both encoders' LoRA.
    extra = TE_FLAGS + ("--train_text_encoder",)
    ref = os.path.join(TMP, "te_ref4")
    train(0, ref, 4, 2, extra)
    out = os.path.join(TMP, "te_np4")
    train(4, out, 1, 2, extra + ("--encoder_process", "3"))
    compare("train_text_encoder: 4 ranks, encoder process 3", ref, out, tol=TE_TOL,
            files=("lora_masters.safetensors", TE_FILE))


def prepare(out, extra=()):
    images = os.path.join(TMP, "images")
    if not os.path.exists(images):
        demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch", "make_demo_images.py")
        run([sys.executable, demo, images, "6"])
    # The demo's subject pictures as spatial conditions: no augmentation, so that cached and
    # online latents come from the same pixels.
    run([BIN, "prepare", "--pretrained_model_name_or_path", MODEL, "--train_data_dir",
         os.path.join(images, "data.jsonl"), "--output", out, "--noise_size", "128", "--cond_size", "64",
         "--spatial_column", "subject", "--lora_num", "1", "--caption_dropout", "0.3", *extra])
    return out


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


def compare_runs(name, ref, got, loss_tol, tol):
    a, b = losses(ref), losses(got)
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"{name}: losses {a} vs {b}: max relative difference {worst:.1e}")
    assert len(a) == len(b) and worst <= loss_tol, f"FAILED: {name}: losses differ by {worst:.1e}"
    compare(name, ref, got, tol=tol)


def online_encoding():
    pixels = prepare(os.path.join(TMP, "pixels.h5"))
    # The float64 autoencoder and text encoders in prepare, as the float64 runs use them online;
    # what prepare stores is rounded to float32 (latents: also online; text: not).
    latents = prepare(os.path.join(TMP, "latents.h5"), ("--cache_latents", "--vae_dtype", "f64"))
    cached_text = prepare(os.path.join(TMP, "cached_text.h5"),
                          ("--cache_latents", "--vae_dtype", "f64", "--cache_text_embeddings", "--text_encoder_dtype",
                           "f64", "--embed_dtype", "f32", "--max_sequence_length", "8"))
    common = ("--noise_size", "128", "--cond_size", "64", "--lora_num", "1", "--max_sequence_length", "8",
              "--learning_rate", "1e-2", "--adam_epsilon", "1", "--max_grad_norm", "0")

    def run_on(data, np_, batch, name, extra=()):
        out = os.path.join(TMP, name)
        train(np_, out, batch, 3, common + ("--train_data", data) + extra)
        return out

    # Images encoded online (batched) vs latents cached by prepare (one image at a time). The
    # captions of both are encoded online by the frozen encoders.
    ref = run_on(latents, 0, 2, "oe_latents")
    moved(ref)
    # Both float64 autoencoder outputs rounded to float32: equal but for batching (measured 3e-14
    # on the losses, 3e-12 on the LoRA).
    compare_runs("online latents, 1 process", ref, run_on(pixels, 0, 2, "oe_pixels"), 1e-12, 1e-10)
    # Under mpirun the autoencoder and the text encoders live on the encoder process only, and
    # the result is the one process's up to summation order.
    compare("online latents: 2 ranks (encoder process 1) vs 1 process", os.path.join(TMP, "oe_pixels"),
            run_on(pixels, 2, 1, "oe_pixels_np2", ("--encoder_process", "1")), tol=TE_TOL)
    # Text embeddings cached by prepare (float32 encoders) vs the frozen encoders online (float64).
    cached = run_on(cached_text, 0, 2, "oe_cached_text")
    # Stored embeddings are the float64 ones rounded to float32 (6e-8): measured 3e-9 on the
    # losses, 1e-7 on the LoRA (its gradients are small sums of large terms: up matrices start at
    # zero; --adam_epsilon 1 keeps AdamW's update linear in them instead of rounding small ones to
    # +-lr).
    compare_runs("cached text embeddings vs the frozen encoders online", ref, cached, 1e-7, 1e-6)
    metrics = [json.loads(l) for l in open(os.path.join(cached, "metrics.jsonl"))]
    assert all("data_wait_ms" in m and m["data_wait_ms"] >= 0 for m in metrics), metrics


def same_bytes(name, ref, got, files=("lora.safetensors", "lora_masters.safetensors")):
    for f in files:
        a = open(os.path.join(ref, f), "rb").read()
        b = open(os.path.join(got, f), "rb").read()
        if a != b:
            sys.exit(f"FAILED: {name}: {f} differs")
    print(f"{name}: {', '.join(files)} bit-identical")


def sharded_streaming():
    for name, common, streamed in [
            ("bf16", ("--shard_weights",), ("--blocks_to_swap", "2")),
            ("fp8", ("--shard_weights", "--base_precision", "fp8"), ("--blocks_to_swap", "2")),
            ("all streamed, checkpointing", ("--shard_weights", "--gradient_checkpointing"), ("--blocks_to_swap", "-1")),
            ("fp8, 2 accumulation steps", ("--shard_weights", "--base_precision", "fp8",
                                           "--gradient_accumulation_steps", "2"), ("--blocks_to_swap", "3"))]:
        tag = name.replace(" ", "_").replace(",", "")
        ref = os.path.join(TMP, f"shard_resident_{tag}")
        train(2, ref, 1, 3, common)
        moved(ref)
        out = os.path.join(TMP, f"shard_streamed_{tag}")
        p, _ = train(2, out, 1, 3, common + streamed)
        assert "streamed from host memory (each rank its 1/2)" in p.stderr, p.stderr
        same_bytes(f"2 ranks, --shard_weights {name}: streamed vs resident", ref, out)


def block_major():
    bm = ("--block_major_accumulation",)
    for name, np_, batch, extra in [
            ("1 process, 3 micro-batches", 0, 2, ("--gradient_accumulation_steps", "3")),
            ("1 process, 2 micro-batches, checkpointing, 2 blocks streamed", 0, 2,
             ("--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--blocks_to_swap", "2")),
            ("2 ranks, 2 micro-batches, sharded weights, 2 blocks streamed", 2, 1,
             ("--gradient_accumulation_steps", "2", "--shard_weights", "--blocks_to_swap", "2")),
            ("2 ranks, 2 micro-batches, non-finite first micro-batch on rank 1", 2, 1,
             ("--gradient_accumulation_steps", "2", "--debug_nan_at_step", "1", "--debug_nan_rank", "1")),
            ("1 process, 2 micro-batches, both text encoders trained", 0, 2,
             TE_FLAGS + ("--train_text_encoder", "--gradient_accumulation_steps", "2"))]:
        tag = name.replace(" ", "_").replace(",", "")
        ref = os.path.join(TMP, f"ordinary_{tag}")
        train(np_, ref, batch, 3, extra)
        moved(ref)
        out = os.path.join(TMP, f"block_major_{tag}")
        train(np_, out, batch, 3, extra + bm)
        files = ("lora_masters.safetensors", TE_FILE) if "--train_text_encoder" in extra else ("lora_masters.safetensors",)
        if "--train_text_encoder" in extra:
            te_moved(ref, True)
        compare(f"--block_major_accumulation, {name}", ref, out, tol=TE_TOL, files=files)
    # The encoder process takes each micro-batch's text gradients back before the next one.
    p, _ = train(2, os.path.join(TMP, "bm_te_np2"), 1, 2,
                 TE_FLAGS + ("--train_text_encoder", "--gradient_accumulation_steps", "2") + bm, expect_ok=False)
    assert p.returncode != 0, p.stderr
    assert "--block_major_accumulation with --train_text_encoder / --train_text_encoder_one_only under mpirun" \
        in p.stderr, p.stderr


if __name__ == "__main__":
    try:
        setup()
        {"data_parallel": data_parallel, "resume": resume, "failure": failure, "text_encoders": text_encoders,
         "online_encoding": online_encoding, "sharded_streaming": sharded_streaming,
         "block_major": block_major}[sys.argv[1]]()
        print("OK")
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
