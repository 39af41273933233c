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
    # --blocks keeps the first D double and S single blocks (quick reproductions): fewer FLOPs.
    one = bench("--blocks", "1/1", "--gradient_checkpointing", "off")
    assert one[0]["step_tflop"] < ec[0]["step_tflop"], (one, ec)
    r = subprocess.run([BIN, "bench", "--size", "tiny", "--device", "cpu", "--blocks", "3/0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--blocks" in r.stderr, r.stderr
    # --profile writes a Chrome trace of one eager step; kernel_classes.py reads it (on the CPU the
    # trace has operators but no GPU kernels: the summary says 0 kernels).
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        bench("--gradient_checkpointing", "off", "--profile", os.path.join(d, "p"))
        trace = os.path.join(d, "p_32_64_4.json")
        with open(trace) as f:
            assert "traceEvents" in json.load(f)
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["python3", os.path.join(here, "..", "..", "bench", "kernel_classes.py"), trace],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["cpu_ops"] > 0 and summary["kernels"] == 0, summary
        bad = os.path.join(d, "bad.json")
        with open(bad, "w") as f:
            f.write("{not json")
        r = subprocess.run(["python3", os.path.join(here, "..", "..", "bench", "kernel_classes.py"), bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "bad.json" in r.stderr, r.stderr
        # --attribute: each kernel of a class is traced back, through its launch's correlation id,
        # to the host ops around the launch (a hand-made trace: CPU runs launch no kernels).
        syn = os.path.join(d, "syn.json")
        ev = [{"ph": "X", "cat": "cpu_op", "name": "autograd::engine::evaluate_function: CatBackward0",
               "ts": 0, "dur": 100, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 10, "dur": 40, "tid": 1},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 20, "dur": 2, "tid": 1,
               "args": {"correlation": 7}},
              {"ph": "X", "cat": "cpu_op", "name": "aten::gelu", "ts": 200, "dur": 10, "tid": 1},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 300, "dur": 2, "tid": 1,
               "args": {"correlation": 8}},
              {"ph": "X", "cat": "kernel", "name": "direct_copy_kernel_cuda", "ts": 25, "dur": 5000,
               "tid": 7, "args": {"correlation": 7}},
              {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel", "ts": 400, "dur": 1000,
               "tid": 7, "args": {"correlation": 8}}]
        with open(syn, "w") as f:
            json.dump({"traceEvents": ev}, f)
        r = subprocess.run(["python3", os.path.join(here, "..", "..", "bench", "kernel_classes.py"),
                            "--attribute", "copy_cat,elementwise", syn], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        att = {(a["class"], a["outer"], a["inner"]): (a["count"], a["ms"]) for a in json.loads(r.stdout)["attribution"]}
        assert att == {("copy_cat", "autograd::engine::evaluate_function: CatBackward0", "aten::copy_"): (1, 5.0),
                       ("elementwise", "(none)", "(none)"): (1, 1.0)}, att
    # The estimate the tier bench compares against counts the LoRA targets it is given.
    def est(*args):
        r = subprocess.run([BIN, "estimate", "--json", "--lora_mode", "standard", "--ranks", "32", *args],
                           capture_output=True, text=True)
        return r
    default, wide = est(), est("--lora_targets", "to_q,to_k,to_v,to_out.0,add_q_proj,proj_mlp,proj_out")
    assert default.returncode == 0 and wide.returncode == 0, (default.stderr, wide.stderr)
    lora = lambda r: json.loads(r.stdout.strip().splitlines()[-1])["lora_gib"]
    assert lora(wide) > lora(default) > 0, (default.stdout, wide.stdout)
    bogus = est("--lora_targets", "to_q,bogus")
    assert bogus.returncode == 2 and "--lora_targets" in bogus.stderr and "bogus" in bogus.stderr, bogus.stderr
    print("bench: three text-encoder modes, --blocks and --profile ran at the tiny size; estimate counts targets")


if __name__ == "__main__":
    main()
