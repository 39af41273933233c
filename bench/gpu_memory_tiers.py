#!/usr/bin/env python3
"""The memory tiers of docs/memory.md measured at FLUX.1-dev size (random weights), one JSON line
per (tier, mode): peak GPU memory as max_memory_allocated (the bench's peak_gib) and as the
driver sees it (nvidia-smi, sampled every 100 ms), the estimate (`fluxtrain estimate --json`
with the same options), peak host RSS of the bench process (its own getrusage, `peak_host_rss_gib`)
beside issue 14's bound (the host-held weights of the plans + 4 GiB), ms per step,
bytes streamed per step and the measured host-to-device bandwidth, so that the speed clause of
issue 14 can be checked: ms_per_step <= max(2 x resident ms, 1.25 x bytes / bandwidth).

Each tier runs twice: with its low-memory options ("low_memory") and fully resident in bf16
("resident", the speed reference: the same step, checkpointing included, with every weight on the
GPU; skipped with --no_resident or --modes low_memory).

  python3 bench/gpu_memory_tiers.py --bin build-gpu/fluxtrain [--tiers standard,ultra-low] [--out DIR]
  python3 bench/gpu_memory_tiers.py --bin build/fluxtrain --size tiny --device cpu   # CPU smoke test

Each row uses its preset's image sizes and rank and its text-encoder mode (`bench
--text_encoder_mode`: real-size random CLIP-L / T5-XXL with their LoRAs in the step, placed as
`train` places them under the row's low-memory options); the 4 GiB row is plain LoRA
(`--lora_mode standard`) at 512 px.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

# tier name, preset file, cond/noise/rank, goal GiB, low-memory flags (as in the preset),
# the row's mode: bench flags and the matching estimate flags (text encoders, LoRA mode)
BOTH = (["--text_encoder_mode", "both", "--text_encoder_rank", "32"], ["--train_text_encoder", "--text_encoder_rank", "32"])
CLIP = (["--text_encoder_mode", "one_only", "--text_encoder_rank", "32"],
        ["--train_text_encoder_one_only", "--text_encoder_rank", "32"])
NONE = ([], [])
# The 4 GiB row trains what its preset trains: train's default standard targets (to_q, to_k, to_v,
# to_out.0: diffusers' FLUX LoRA default), not the bench's wider issue-15 comparison set.
STANDARD = (["--lora_mode", "standard", "--lora_targets", "default"], ["--lora_mode", "standard"])
TIERS = [
    ("standard", "standard.ini", "384/768/64", 16, ["--base_precision", "fp8", "--max_gpu_memory", "14GiB"], BOTH),
    ("text-encoder-one-only", "text-encoder-one-only.ini", "384/768/64", 14,
     ["--base_precision", "fp8", "--max_gpu_memory", "12GiB"], CLIP),
    ("text-encoder-one-low-memory", "text-encoder-one-low-memory.ini", "256/512/32", 8,
     ["--base_precision", "fp8", "--max_gpu_memory", "7GiB"], CLIP),
    ("ultra-low", "ultra-low.ini", "192/384/16", 6, ["--base_precision", "fp8", "--max_gpu_memory", "5GiB"], NONE),
    ("no-text-encoder", "no-text-encoder.ini", "256/512/32", 6,
     ["--base_precision", "fp8", "--max_gpu_memory", "5GiB"], NONE),
    ("low-vram-4gb", "low-vram-4gb.ini", "0/512/32", 4,
     ["--base_precision", "fp8", "--fp8_modulation", "--blocks_to_swap", "-1", "--offload_prefetch", "1"], STANDARD),
]


class SmiSampler:
    """Peak memory.used of one GPU from nvidia-smi (MiB), sampled while the child runs."""

    def __init__(self, gpu):
        self.gpu, self.peak, self.proc = gpu, 0, None

    def __enter__(self):
        if shutil.which("nvidia-smi") and self.gpu is not None:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.gpu), "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.peak = max(self.peak, int(line))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)


def run_child(cmd, gpu):
    """Runs cmd, returns (stdout, stderr, rc, driver peak MiB, seconds)."""
    t0 = time.time()
    with SmiSampler(gpu) as smi:
        p = subprocess.run(cmd, capture_output=True, text=True)
    return p.stdout, p.stderr, p.returncode, smi.peak, time.time() - t0


def host_weights_gib(low_memory):
    """GiB the plans hold in host memory: the transformer's blocks and T5's layers ("in host memory X GiB")."""
    plans = [low_memory.get("plan", ""), low_memory.get("t5_plan", "")]
    return sum(float(m) for p in plans for m in re.findall(r"in host memory ([0-9.]+) GiB", p))


def estimate(binary, cfg, ckpt, size, flags, mode_flags):
    c, n, r = cfg.split("/")
    cmd = [binary, "estimate", "--json", "--size", size, "--cond_size", c if c != "0" else "16", "--noise_size", n,
           "--ranks", r, "--gradient_checkpointing", "1" if ckpt else "0"] + flags + mode_flags
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"estimate_error": (p.stderr.strip() or p.stdout.strip())[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bandwidth(binary):
    p = subprocess.run([binary, "doctor", "--gpu_memory", "1GiB"], capture_output=True, text=True)
    m = re.search(r"host-to-device ([0-9.]+) GB/s", p.stdout)
    return float(m.group(1)) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build-gpu/fluxtrain")
    ap.add_argument("--size", default="flux-dev")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiers", default=",".join(t[0] for t in TIERS))
    ap.add_argument("--warmup", default="2")
    ap.add_argument("--iters", default="5")
    ap.add_argument("--no_resident", action="store_true")
    ap.add_argument("--modes", default="low_memory,resident", help="which of the two runs per tier")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    gpu = None  # nvidia-smi's (physical) index of the bench's GPU
    if a.device.startswith("cuda"):
        logical = int(a.device.split(":")[1]) if ":" in a.device else 0
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        gpu = visible[logical] if logical < len(visible) else logical
    bw = bandwidth(a.bin) if a.device.startswith("cuda") else None
    wanted = a.tiers.split(",")
    with open(os.path.join(a.out, "memory_tiers.jsonl"), "a") as log:
        for name, preset, cfg, goal, flags, (bench_mode, est_mode) in TIERS:
            if name not in wanted:
                continue
            modes = [m for m in a.modes.split(",") if m in ("low_memory", "resident")]
            for mode in [m for m in modes if not (a.no_resident and m == "resident")]:
                # The speed reference is the same step (checkpointing included) with every weight
                # resident in bf16: only where the weights live differs.
                ckpt = True
                mflags = flags if mode == "low_memory" else []
                cmd = [a.bin, "bench", "--size", a.size, "--device", a.device, "--configs", cfg,
                       "--gradient_checkpointing", "on" if ckpt else "off", "--cuda_graph", "off",
                       "--warmup", a.warmup, "--iters", a.iters] + mflags + bench_mode
                out, err, rc, smi_mib, secs = run_child(cmd, gpu)
                row = {"name": "memory_tier", "tier": name, "preset": "configs/" + preset, "mode": mode,
                       "goal_gib": goal, "config": cfg, "gradient_checkpointing": ckpt, "flags": mflags + bench_mode,
                       "host_to_device_gb_s": bw, "wall_s": round(secs, 1)}
                lines = [l for l in out.splitlines() if l.startswith("{")]
                if rc != 0 or not lines:
                    row["error"] = (err.strip().splitlines() or ["no output"])[-1][-300:]
                else:
                    j = json.loads(lines[-1])
                    row["ms_per_step"] = j.get("ms_per_step")
                    row["peak_allocated_gib"] = j.get("peak_gib")
                    for k in ("bytes_streamed_per_step", "weights", "low_memory", "encoders_gib", "peak_host_rss_gib"):
                        if k in j:
                            row[k] = j[k]
                    held = host_weights_gib(j.get("low_memory", {}))
                    row["host_weights_gib"] = round(held, 2)
                    row["host_rss_bound_gib"] = round(held + 4, 2)  # issue 14: held weights + 4 GiB
                    if "error" in j:
                        row["error"] = j["error"]
                row["peak_driver_gib"] = round(smi_mib / 1024, 3) if smi_mib else None
                est = estimate(a.bin, cfg, ckpt, a.size, mflags, est_mode)
                row["estimate"] = est
                streamed = row.get("bytes_streamed_per_step", est.get("bytes_streamed_per_step"))
                if bw and streamed:
                    row["stream_bound_ms"] = round(1.25 * streamed / (bw * 1e9) * 1e3, 1)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()  # a timeout must not lose the rows already measured


if __name__ == "__main__":
    sys.exit(main())
