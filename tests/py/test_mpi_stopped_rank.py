#!/usr/bin/env python3
"""A stopped rank ends the job (issue 16, point 3).

`mpirun -np 2 fluxtrain train` on the tiny model (CPU, MPI backend) with --mpi_timeout 3; once
training runs, rank 1 gets SIGSTOP. The job must end by itself within a bounded time (timeout +
grace + MPI_Abort: well under 60 s), with a non-zero exit status, one line from rank 0 naming
rank 1 ("rank 1 did not answer"), no process of the job left, and the last checkpoint must
resume to the end.

Environment: FLUXTRAIN_BIN; mpirun on PATH (MPIEXEC overrides).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BIN = os.environ["FLUXTRAIN_BIN"]
MPIEXEC = os.environ.get("MPIEXEC", "mpirun")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
TMP = tempfile.mkdtemp(prefix="fluxtrain_stop_")


def check(cmd):
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def flags(out, steps, extra=()):
    return [BIN, "train", "--pretrained_model_name_or_path", os.path.join(TMP, "model"),
            "--train_data", os.path.join(TMP, "data.h5"), "--output_dir", out, "--mixed_precision", "no",
            "--device", "cpu", "--ranks", "4", "--network_alphas", "4", "--cond_size", "64", "--noise_size", "64",
            "--seed", "5", "--validation_steps", "0", "--num_threads", "1", "--prefetch_batches", "1",
            "--max_train_steps", str(steps), "--checkpointing_steps", "5", *extra]


def job_ranks(root_pid):
    """pid -> MPI rank of the fluxtrain processes below root_pid (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    ranks, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                with open(f"/proc/{c}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"fluxtrain" in cmd and b"OMPI_COMM_WORLD_RANK" in env:
                ranks[c] = int(env[b"OMPI_COMM_WORLD_RANK"])
    return ranks


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main():
    check([BIN, "init-model", "--size", "tiny", "--layout", "bfl", "--output_dir", os.path.join(TMP, "model")])
    check([BIN, "synth-data", "--output", os.path.join(TMP, "data.h5"), "--size", "tiny", "--num_samples", "8",
           "--sizes", "8", "--cond_latent_size", "8", "--text_len", "4"])
    out = os.path.join(TMP, "out")
    cmd = [MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-np", "2",
           *flags(out, 100000, ("--mpi_timeout", "3"))]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        # Wait until training runs and a checkpoint exists (rank 0 writes metrics each step).
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(out, "checkpoint-5.h5")):
            if time.time() > deadline or p.poll() is not None:
                sys.exit("FAILED: the job did not start training\n" + (p.communicate()[1] if p.poll() is not None else ""))
            time.sleep(0.05)
        ranks = job_ranks(p.pid)
        victim = [pid for pid, r in ranks.items() if r == 1]
        assert len(victim) == 1 and len(ranks) == 2, f"ranks found: {ranks}"
        os.kill(victim[0], signal.SIGSTOP)
        t0 = time.time()
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sys.exit("FAILED: the job with a stopped rank did not end within 60 s")
        dt = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"stopped rank: the job ended {dt:.1f} s after SIGSTOP, exit status {p.returncode}")
    lines = [l for l in stderr.splitlines() if l.startswith("rank ")]
    print("\n".join(lines))
    assert p.returncode != 0, "mpirun exited 0"
    assert dt < 30, f"took {dt:.1f} s (timeout 3 s)"
    assert any("rank 0: MPI " in l and "did not complete within 3 s (--mpi_timeout); rank 1 did not answer" in l
               for l in lines), stderr
    time.sleep(1)
    left = [pid for pid in ranks if alive(pid)]
    assert not left, f"processes left: {left}"

    # The last checkpoint resumes to the end.
    cks = sorted((int(f[11:-3]), f) for f in os.listdir(out) if f.startswith("checkpoint-") and f.endswith(".h5"))
    assert cks, os.listdir(out)
    last = cks[-1][0]
    r = check([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-np", "2",
               *flags(out, last + 2, ("--resume_from_checkpoint", "latest"))])
    assert f"at step {last}" in r.stdout + r.stderr, r.stdout + r.stderr
    assert os.path.exists(os.path.join(out, "lora.safetensors"))
    print(f"resumed from checkpoint-{last}.h5 and finished")


if __name__ == "__main__":
    try:
        main()
        print("OK")
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
