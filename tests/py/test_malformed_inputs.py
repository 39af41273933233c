"""Malformed inputs to the commands other than `train` (issue 16): prepare, sample, convert-lora,
encode, vae, estimate, image.

Every case must end with exit status 2 and exactly ONE line on stderr that names the file or flag
(the `needles`), and must leave what was already written as it was: each case names files that
exist before it runs (outputs it would overwrite, inputs it reads) and their bytes are compared
after. A crash, an exit status other than 2, an "internal error", a second line or a changed file
is a failure. Fixtures: the tiny model (init-model), a synthetic dataset (synth-data), a short
EasyControl training run for a real condition LoRA, a 32x32 PNG (Pillow).

Runs in about 30 s on 2 cores. `-v` prints every case's line.
"""
import os
import shutil
import subprocess
import sys
import tempfile

BIN = os.environ["FLUXTRAIN_BIN"]
# The fixtures may come from another build (to see what an older binary gives for each case).
FIXTURE_BIN = os.environ.get("FLUXTRAIN_FIXTURE_BIN", BIN)
VERBOSE = "-v" in sys.argv


def run_ok(*args):
    r = subprocess.run([FIXTURE_BIN, *args], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"fixture: fluxtrain {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def write(path, data):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def read(path):
    with open(path, "rb") as f:
        return f.read()


results = []  # (command, case, ok, detail)


def case(command, name, args, needles, protect=(), timeout=120):
    """Runs `fluxtrain command args`; expects exit 2, one stderr line holding every needle, and
    the files in `protect` unchanged."""
    before = {p: read(p) for p in protect}
    try:
        r = subprocess.run([BIN, command, *args], capture_output=True, text=True, timeout=timeout,
                           errors="replace")
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    lines = [l for l in err.splitlines() if l.strip()]
    problems = []
    if rc != 2:
        problems.append(f"exit {rc}")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    text = lines[-1] if lines else ""
    if "internal error" in err:
        problems.append("internal error")
    missing = [n for n in needles if n not in err]
    if missing:
        problems.append(f"message lacks {missing}")
    for p, b in before.items():
        if not os.path.exists(p) or read(p) != b:
            problems.append(f"{os.path.basename(p)} changed")
    ok = not problems
    results.append((command, name, ok, text if ok else "; ".join(problems) + " | " + " / ".join(lines[:3])))


def main():
    tmp = tempfile.mkdtemp(prefix="fluxtrain_malformed_")
    try:
        run_cases(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(c) + len(n) for c, n, _, _ in results) + 3
    failed = 0
    for c, n, ok, detail in results:
        failed += not ok
        if VERBOSE or not ok:
            print(f"{'ok  ' if ok else 'FAIL'} {(c + ': ' + n).ljust(width)} {detail}")
    print(f"{len(results) - failed}/{len(results)} malformed-input cases refused cleanly")
    return 1 if failed else 0


def run_cases(tmp):
    j = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    from PIL import Image

    # ---- fixtures -------------------------------------------------------------------------
    model = j("model")
    run_ok("init-model", "--size", "tiny", "--layout", "both", "--output_dir", model)
    data = j("data.h5")
    run_ok("synth-data", "--output", data, "--size", "tiny", "--num_samples", "4", "--sizes", "8",
           "--cond_latent_size", "8", "--text_len", "4")
    run_dir = j("run")
    run_ok("train", "--pretrained_model_name_or_path", model, "--train_data", data, "--output_dir", run_dir,
           "--mixed_precision", "no", "--device", "cpu", "--ranks", "4", "--network_alphas", "4",
           "--cond_size", "64", "--noise_size", "64", "--max_train_steps", "1", "--validation_steps", "0",
           "--num_threads", "1", "--prefetch_batches", "1")
    ec_lora = os.path.join(run_dir, "lora.safetensors")  # an EasyControl condition LoRA
    png = j("img.png")
    Image.new("RGB", (32, 32), (200, 30, 40)).save(png)
    junk = write(j("junk.bin"), b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    junk_st = write(j("junk.safetensors"), b"\xff" * 8 + b"not a safetensors file")
    existing = write(j("existing.out"), b"earlier output: must survive")
    existing_png = write(j("existing.png"), b"earlier image: must survive")
    existing_h5 = write(j("existing.h5"), b"earlier dataset: must survive")
    afile = write(j("a_file"), b"a regular file, not a folder")
    adir = j("a_dir")
    os.makedirs(adir)
    missing_dir = j("no_such_dir")
    good_jsonl = write(j("data.jsonl"), '{"source": "img.png", "caption": "a red square", "target": "img.png"}\n')
    prompts = write(j("prompts.txt"), "a red square\n")
    empty_prompts = write(j("empty.txt"), "")
    bad_model = j("bad_model")  # the tiny snapshot with a truncated transformer file
    os.makedirs(bad_model)
    bfl = os.path.join(model, "flux1-dev.safetensors")
    write(os.path.join(bad_model, "flux1-dev.safetensors"), read(bfl)[: os.path.getsize(bfl) // 3])
    shutil.copy(os.path.join(model, "ae.safetensors"), bad_model)
    no_tok = j("no_tokenizer")  # the tiny snapshot without tokenizer/
    shutil.copytree(model, no_tok)
    shutil.rmtree(os.path.join(no_tok, "tokenizer"))
    vips = subprocess.run([BIN, "image", "--input", png, "--output", j("probe.safetensors")],
                          capture_output=True, text=True).returncode == 0

    # ---- prepare --------------------------------------------------------------------------
    pre = ["--spatial_column", "source", "--noise_size", "64", "--cond_size", "64"]
    case("prepare", "jsonl missing", ["--train_data_dir", j("missing.jsonl"), "--output", existing_h5, *pre],
         ["missing.jsonl"], [existing_h5])
    case("prepare", "jsonl is a directory", ["--train_data_dir", adir, "--output", existing_h5, *pre],
         ["a_dir"], [existing_h5])
    case("prepare", "output in a missing folder",
         ["--train_data_dir", good_jsonl, "--output", os.path.join(missing_dir, "x.h5"), *pre],
         ["--output", "no_such_dir"], [good_jsonl])
    case("prepare", "output is a directory", ["--train_data_dir", good_jsonl, "--output", adir, *pre],
         ["--output", "a_dir", "directory"], [good_jsonl])
    case("prepare", "output under a file", ["--train_data_dir", good_jsonl, "--output", os.path.join(afile, "x.h5"), *pre],
         ["--output", "a_file"], [afile])
    case("prepare", "output equal to the jsonl", ["--train_data_dir", good_jsonl, "--output", good_jsonl, *pre],
         ["--output", "data.jsonl"], [good_jsonl])
    case("prepare", "--noise_size not a multiple of 16",
         ["--train_data_dir", good_jsonl, "--output", existing_h5, "--noise_size", "100"], ["--noise_size"], [existing_h5])

    # ---- sample ---------------------------------------------------------------------------
    smp = ["--prompt", "a red square", "--height", "32", "--width", "32", "--num_inference_steps", "1"]
    case("sample", "model folder missing", ["--pretrained_model_name_or_path", j("no_model"), *smp, "--output", existing_png],
         ["no_model"], [existing_png])
    case("sample", "model file corrupt", ["--pretrained_model_name_or_path", bad_model, *smp, "--output", existing_png],
         ["flux1-dev.safetensors"], [existing_png])
    case("sample", "--height not a multiple of 16",
         ["--pretrained_model_name_or_path", model, "--prompt", "x", "--height", "100", "--output", existing_png],
         ["--height", "16"], [existing_png])
    case("sample", "--lora corrupt", ["--pretrained_model_name_or_path", model, *smp, "--lora", junk_st,
                                       "--output", existing_png], ["junk.safetensors"], [existing_png, junk_st])
    case("sample", "--lora missing", ["--pretrained_model_name_or_path", model, *smp, "--lora", j("nolora.safetensors"),
                                       "--output", existing_png], ["--lora", "nolora.safetensors"], [existing_png])
    case("sample", "--prompts missing", ["--pretrained_model_name_or_path", model, "--prompts", j("noprompts.txt"),
                                          "--output_dir", adir], ["noprompts.txt"])
    case("sample", "--prompts empty", ["--pretrained_model_name_or_path", model, "--prompts", empty_prompts,
                                        "--output_dir", adir], ["--prompts", "empty.txt"])
    case("sample", "--output in a missing folder",
         ["--pretrained_model_name_or_path", model, *smp, "--output", os.path.join(missing_dir, "x.png")],
         ["--output", "no_such_dir"])
    case("sample", "--output is a directory", ["--pretrained_model_name_or_path", model, *smp, "--output", adir],
         ["--output", "a_dir"])
    case("sample", "--output_dir under a file (not writable)",
         ["--pretrained_model_name_or_path", model, "--prompts", prompts, "--height", "32", "--width", "32",
          "--num_inference_steps", "1", "--output_dir", os.path.join(afile, "out")], ["--output_dir", "a_file"], [afile])
    case("sample", "--subject_image missing", ["--pretrained_model_name_or_path", model, *smp, "--lora", ec_lora,
                                                "--subject_image", j("nosubject.png"), "--output", existing_png],
         ["--subject_image", "nosubject.png"], [existing_png])
    if vips:
        case("sample", "--subject_image undecodable", ["--pretrained_model_name_or_path", model, *smp, "--lora", ec_lora,
                                                        "--subject_image", junk, "--output", existing_png],
             ["junk.bin"], [existing_png, junk])

    # ---- convert-lora ---------------------------------------------------------------------
    case("convert-lora", "input corrupt", ["--input", junk_st, "--output", existing, "--to", "kohya", "--model", "tiny"],
         ["junk.safetensors"], [existing, junk_st])
    case("convert-lora", "input missing", ["--input", j("nope.safetensors"), "--output", existing, "--to", "kohya",
                                            "--model", "tiny"], ["nope.safetensors"], [existing])
    case("convert-lora", "unknown --to", ["--input", ec_lora, "--output", existing, "--to", "comfy", "--model", "tiny"],
         ["--to", "comfy"], [existing, ec_lora])
    case("convert-lora", "output equal to input", ["--input", ec_lora, "--output", ec_lora, "--to", "easycontrol",
                                                    "--model", "tiny"], ["--output", "--input"], [ec_lora])
    case("convert-lora", "condition LoRA to kohya", ["--input", ec_lora, "--output", existing, "--to", "kohya",
                                                      "--model", "tiny"], ["kohya", "easycontrol"], [existing, ec_lora])
    case("convert-lora", "--model of other widths", ["--input", ec_lora, "--output", existing, "--to", "easycontrol",
                                                      "--model", "flux-dev"], ["lora.safetensors"], [existing, ec_lora])
    case("convert-lora", "output in a missing folder", ["--input", ec_lora, "--output", os.path.join(missing_dir, "x"),
                                                         "--to", "easycontrol", "--model", "tiny"], ["no_such_dir"], [ec_lora])

    # ---- encode ---------------------------------------------------------------------------
    enc = ["--prompts", prompts, "--output", existing]
    case("encode", "tokenizer folder missing", ["--pretrained_model_name_or_path", no_tok, *enc], ["tokenizer"], [existing])
    case("encode", "model folder missing", ["--pretrained_model_name_or_path", j("no_model"), *enc], ["no_model"], [existing])
    case("encode", "--max_sequence_length 0", ["--pretrained_model_name_or_path", model, *enc, "--max_sequence_length", "0"],
         ["--max_sequence_length"], [existing])
    case("encode", "--max_sequence_length absurd",
         ["--pretrained_model_name_or_path", model, *enc, "--max_sequence_length", "100000000"],
         ["--max_sequence_length"], [existing])
    case("encode", "--max_sequence_length not a number",
         ["--pretrained_model_name_or_path", model, *enc, "--max_sequence_length", "many"], ["max_sequence_length"], [existing])
    case("encode", "--prompts missing", ["--pretrained_model_name_or_path", model, "--prompts", j("noprompts.txt"),
                                          "--output", existing], ["noprompts.txt"], [existing])
    case("encode", "--bench_batches not a number", ["--bench", "--bench_size", "tiny", "--bench_batches", "x"],
         ["--bench_batches"])

    # ---- vae ------------------------------------------------------------------------------
    import torch
    from safetensors.torch import save_file
    imgs3 = j("images3.safetensors")
    save_file({"images": torch.zeros(3, 32, 32)}, imgs3)  # no batch dimension
    imgs_odd = j("images_odd.safetensors")
    save_file({"images": torch.zeros(1, 3, 20, 20)}, imgs_odd)  # not a multiple of 8 (the VAE's factor)
    lat_bad = j("latents_bad.safetensors")
    save_file({"latents": torch.zeros(1, 5, 4, 4)}, lat_bad)  # 5 channels, the tiny VAE has others
    case("vae", "model missing", ["--pretrained_model_name_or_path", j("no_model"), "--encode", imgs3, "--output", existing],
         ["no_model"], [existing])
    case("vae", "--encode file missing", ["--pretrained_model_name_or_path", model, "--encode", j("none.safetensors"),
                                           "--output", existing], ["none.safetensors"], [existing])
    case("vae", "--encode file corrupt", ["--pretrained_model_name_or_path", model, "--encode", junk_st,
                                           "--output", existing], ["junk.safetensors"], [existing])
    case("vae", "--encode images without a batch dimension",
         ["--pretrained_model_name_or_path", model, "--encode", imgs3, "--output", existing], ["images"], [existing])
    case("vae", "--encode images of an odd size",
         ["--pretrained_model_name_or_path", model, "--encode", imgs_odd, "--output", existing], ["images"], [existing])
    case("vae", "--decode latents of the wrong channels",
         ["--pretrained_model_name_or_path", model, "--decode", lat_bad, "--output", existing], ["latents"], [existing])
    case("vae", "--tile_size not a multiple of 16", ["--pretrained_model_name_or_path", model, "--encode", imgs3,
                                                      "--output", existing, "--tile_size", "100"], ["--tile_size"], [existing])
    imgs_ok = j("images_ok.safetensors")
    save_file({"images": torch.zeros(1, 3, 32, 32)}, imgs_ok)
    case("vae", "--output in a missing folder", ["--pretrained_model_name_or_path", model, "--encode", imgs_ok,
                                                  "--output", os.path.join(missing_dir, "x")], ["no_such_dir"])

    # ---- estimate -------------------------------------------------------------------------
    bad_ini = write(j("bad.ini"), "[lora\nranks = = =\n")
    case("estimate", "--config missing", ["--config", j("none.ini")], ["none.ini"])
    case("estimate", "--config a directory", ["--config", adir], ["--config", "a_dir", "directory"])
    case("estimate", "--config malformed", ["--config", bad_ini], ["bad.ini"])
    case("estimate", "--noise_size absurd", ["--noise_size", "1048576"], ["--noise_size"])
    case("estimate", "--cond_size absurd", ["--cond_size", "16777216"], ["--cond_size"])
    case("estimate", "--ranks absurd", ["--ranks", "100000000"], ["--ranks"])
    case("estimate", "--ranks not a number", ["--ranks", "big"], ["--ranks"])
    case("estimate", "--train_batch_size absurd", ["--train_batch_size", "1000000000000"], ["--train_batch_size"])
    case("estimate", "--lora_num absurd", ["--lora_num", "100000"], ["--lora_num"])
    case("estimate", "--txt_len absurd", ["--txt_len", "100000000"], ["--txt_len"])
    case("estimate", "--world_size absurd", ["--world_size", "100000000000"], ["--world_size"])
    case("estimate", "--size unknown", ["--size", "flux-huge"], ["--size"])

    # ---- image ----------------------------------------------------------------------------
    case("image", "--input missing", ["--input", j("none.png"), "--output", existing], ["none.png"], [existing])
    case("image", "--input a directory", ["--input", adir, "--output", existing], ["a_dir"], [existing])
    case("image", "--resize malformed", ["--input", png, "--output", existing, "--resize", "0,5"], ["--resize"], [existing])
    case("image", "--resize absurd", ["--input", png, "--output", existing, "--resize", "1000000,1000000"], ["--resize"],
         [existing])
    case("image", "--filter unknown", ["--input", png, "--output", existing, "--filter", "lanczos"], ["--filter"], [existing])
    if vips:
        case("image", "--input undecodable", ["--input", junk, "--output", existing], ["junk.bin"], [existing, junk])
        case("image", "--output in a missing folder", ["--input", png, "--output", os.path.join(missing_dir, "x")],
             ["no_such_dir"])
        case("image", "--png under a file", ["--input", png, "--png", os.path.join(afile, "x.png")], ["a_file"], [afile])


if __name__ == "__main__":
    sys.exit(main())
