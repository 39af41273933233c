"""`fluxtrain bench` on the CPU at the tiny size: every text-encoder mode runs a step and prints
one JSON line with the fields the GPU tables are made from (bench/*.sh, docs/benchmarks.md).
Nothing here is timed: the figures come from the GPU runs."""
import json
import os
import subprocess

BIN = os.environ["FLUXTRAIN_BIN"]


def bench(*args):
    r = subprocess.run([BIN, "bench", "--size", "tiny", "--device", "cpu", "--dtype", "f32", "--configs", "32/64/4",
                        "--gradient_checkpointing", "both", "--warmup", "1", "--iters", "1", *args],
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
    r = subprocess.run([BIN, "bench", "--size", "tiny", "--device", "cpu", "--text_encoder_mode", "clip"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--text_encoder_mode" in r.stderr, r.stderr
    print("bench: three text-encoder modes ran at the tiny size")


if __name__ == "__main__":
    main()
