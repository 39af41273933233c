"""`fluxtrain bench` on the CPU at the tiny size: every text-encoder mode runs a step and prints
one JSON line with the fields the GPU tables are made from (bench/*.sh, docs/benchmarks.md).
Nothing here is timed: the figures come from the GPU runs."""
import json
import os
import subprocess

BIN = os.environ["FLUXTRAIN_BIN"]


def bench(*args):
    ckpt = [] if "--gradient_checkpointing" in args else ["--gradient_checkpointing", "both"]
    r = subprocess.run([BIN, "bench", "--size", "tiny", "--device", "cpu", "--dtype", "f32", "--configs", "32/64/4",
                        *ckpt, "--warmup", "1", "--iters", "1", *args],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


def main():
    for mode, t5 in (("none", None), ("one_only", "cached states"), ("both", "trained")):
        rows = bench("--text_encoder_mode", mode)
        assert len(rows) == 2, rows  # checkpointing off and on
        for j in rows:
            assert "error" not in j, j
            assert j["config"]["text_encoder_mode"] == mode
            assert j["ms_per_step"] > 0
            assert j.get("t5") == t5, j
            if mode != "none":
                assert j["encoders_gib"] > 0
    # Plain LoRA on every token (kohya/diffusers-style): no condition, more LoRA FLOPs per step.
    std = bench("--lora_mode", "standard", "--gradient_checkpointing", "off")
    ec = bench("--gradient_checkpointing", "off")
    assert len(std) == 1 and std[0]["config"]["lora_mode"] == "standard" and "error" not in std[0], std
    assert ec[0]["config"]["lora_mode"] == "easycontrol"
    # No condition tokens, but LoRAs on every text and noise token: another FLOP count.
    assert std[0]["step_tflop"] > 0 and std[0]["step_tflop"] != ec[0]["step_tflop"], (std, ec)
    r = subprocess.run([BIN, "bench", "--size", "tiny", "--device", "cpu", "--lora_mode", "kohya"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--lora_mode" in r.stderr, r.stderr
    r = subprocess.run([BIN, "bench", "--size", "tiny", "--device", "cpu", "--text_encoder_mode", "clip"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--text_encoder_mode" in r.stderr, r.stderr
    print("bench: three text-encoder modes ran at the tiny size")


if __name__ == "__main__":
    main()
