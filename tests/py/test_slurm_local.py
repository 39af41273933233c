#!/usr/bin/env python3
"""cluster/slurm_1node_8gpu.sbatch run for real on a single-node Slurm (issue 16).

Sets up munge + slurmctld + slurmd on this machine (root, Debian's slurmctld/slurmd/munge; all
state, sockets and ports private to a temporary folder; select/cons_tres), then:
  1. submits the batch script, edited only in its "edit here" block (the tiny model, its data,
     the tiny-cpu preset) with 2 tasks and no GPUs on the sbatch command line, with `sbatch
     --wait`: exit status 0, lora.safetensors written, 2 ranks in the log;
  2. submits a long run, kills one task (SIGKILL) once checkpoints exist: the job ends by itself
     (srun --kill-on-bad-exit) with a failed state, and a resubmission with
     --resume_from_checkpoint latest resumes from the last checkpoint and finishes.
Skipped (exit 0, "SKIPPED") without root or without the packages.

Environment: FLUXTRAIN_BIN, FLUXTRAIN_SOURCE_DIR.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BIN = os.environ["FLUXTRAIN_BIN"]
SRC = os.environ["FLUXTRAIN_SOURCE_DIR"]
NEEDED = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol"]


def skip(why):
    print(f"SKIPPED: {why}")
    sys.exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env, timeout=120, check=True):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


class LocalSlurm:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        host = socket.gethostname()
        for d in ["munge", "state", "spool", "log"]:
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        os.chmod(os.path.join(tmp, "munge"), 0o700)
        key = os.path.join(tmp, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self.sock = os.path.join(tmp, "munge", "munge.socket")
        conf = os.path.join(tmp, "slurm.conf")
        cpus = os.cpu_count() or 2
        with open(conf, "w") as f:
            f.write(f"""ClusterName=fluxtrain-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.sock}
CredType=cred/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=2
InactiveLimit=0
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.env = dict(os.environ, SLURM_CONF=conf, OMP_NUM_THREADS="1")
        self.start(["munged", "-F", "-f", f"--key-file={key}", f"--socket={self.sock}",
                    f"--pid-file={tmp}/munge/munged.pid", f"--log-file={tmp}/log/munged.log",
                    f"--seed-file={tmp}/munge/munged.seed"])
        self.wait_for(lambda: os.path.exists(self.sock), "munged")
        self.start(["slurmctld", "-D", "-i", "-f", conf])
        self.start(["slurmd", "-D", "-f", conf])
        self.wait_for(lambda: "idle" in run(["sinfo", "-h", "-o", "%T"], self.env, check=False).stdout,
                      "an idle node")

    def start(self, cmd):
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=open(os.path.join(self.tmp, "log", os.path.basename(cmd[0]) + ".err"), "w")))

    def wait_for(self, cond, what, secs=60):
        t = time.time() + secs
        while time.time() < t:
            if cond():
                return
            for p in self.procs:
                if p.poll() is not None:
                    sys.exit(f"FAILED: {p.args[0]} exited ({p.returncode}) while waiting for {what}\n" + self.logs())
            time.sleep(0.3)
        sys.exit(f"FAILED: no {what} after {secs} s\n" + self.logs())

    def logs(self):
        out = ""
        for n in sorted(os.listdir(os.path.join(self.tmp, "log"))):
            with open(os.path.join(self.tmp, "log", n), errors="replace") as f:
                out += f"--- {n}\n" + "".join(f.readlines()[-15:])
        return out

    def stop(self):
        for p in reversed(self.procs):  # only the daemons this test started
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def edited_script(tmp, name, out, extra):
    """cluster/slurm_1node_8gpu.sbatch with only its edit-here block changed."""
    with open(os.path.join(SRC, "cluster", "slurm_1node_8gpu.sbatch")) as f:
        s = f.read()
    begin, end = s.index("# ==== edit here"), s.index("# ====", s.index("# ==== edit here") + 10)
    block = f"""# ==== edit here (test) ==========================================================
FLUXTRAIN={BIN}
CONFIG={SRC}/configs/tiny-cpu.ini
MODEL={tmp}/model
DATA={tmp}/data.h5
OUTPUT_DIR={out}
EXTRA_ARGS=({' '.join(extra)})
MODULES=()
"""
    s = s[:begin] + block + s[end:]
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(s)
    return path


# 2 tasks, no GPUs, one core each: on the sbatch command line (it wins over #SBATCH lines).
SBATCH = ["sbatch", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0"]
TINY = ["--device", "cpu", "--mixed_precision", "no", "--num_threads", "1", "--validation_steps", "0",
        "--cond_size", "64", "--noise_size", "64", "--ranks", "4", "--network_alphas", "4", "--seed", "3"]


def main():
    if os.geteuid() != 0:
        skip("needs root to run munged/slurmctld/slurmd")
    missing = [c for c in NEEDED if not shutil.which(c)]
    if missing:
        skip("not installed: " + " ".join(missing) + " (apt-get install slurmctld slurmd slurm-client munge)")
    tmp = tempfile.mkdtemp(prefix="fluxtrain_slurm_")
    os.chmod(tmp, 0o755)
    slurm = None
    try:
        run([BIN, "init-model", "--size", "tiny", "--layout", "bfl", "--output_dir", f"{tmp}/model"], os.environ)
        run([BIN, "synth-data", "--output", f"{tmp}/data.h5", "--size", "tiny", "--num_samples", "8", "--sizes", "8",
             "--cond_latent_size", "8", "--text_len", "4"], os.environ)
        slurm = LocalSlurm(tmp)
        env = slurm.env

        # 1. A short run with sbatch --wait.
        out = f"{tmp}/run1"
        script = edited_script(tmp, "run1.sbatch", out, TINY + ["--max_train_steps", "4", "--checkpointing_steps", "2"])
        t0 = time.time()
        p = run(SBATCH + ["--wait", f"--output={tmp}/run1.log", script], env, timeout=300, check=False)
        log = open(f"{tmp}/run1.log", errors="replace").read() if os.path.exists(f"{tmp}/run1.log") else ""
        if p.returncode != 0:
            sys.exit(f"FAILED: sbatch --wait exit {p.returncode}\n{p.stdout}{p.stderr}\n--- job log\n{log}\n" + slurm.logs())
        assert os.path.exists(f"{out}/lora.safetensors"), os.listdir(out)
        assert "2 rank(s) x batch" in log, log
        print(f"sbatch --wait: exit 0 after {time.time() - t0:.1f} s, {out}/lora.safetensors written, 2 ranks")

        # 2. A task killed mid-run: the job ends, the last checkpoint resumes.
        out = f"{tmp}/run2"
        script = edited_script(tmp, "run2.sbatch", out, TINY + ["--max_train_steps", "100000", "--checkpointing_steps", "3"])
        p = run(SBATCH + ["--parsable", f"--output={tmp}/run2.log", script], env)
        job = p.stdout.strip().split(";")[0]
        deadline = time.time() + 120
        while not (os.path.isdir(out) and any(f.startswith("checkpoint-") and f.endswith(".h5") for f in os.listdir(out))):
            if time.time() > deadline:
                sys.exit("FAILED: no checkpoint from the long job\n" + open(f"{tmp}/run2.log").read() + slurm.logs())
            time.sleep(0.2)
        pids = [int(x) for x in run(["pgrep", "-f", "--", f"--output_dir {out}"], env, check=False).stdout.split()]
        ranks = {}
        for pid in pids:
            try:
                e = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if cmd.startswith(BIN.encode()):
                for kv in e:
                    if kv.startswith(b"SLURM_PROCID="):
                        ranks[int(kv.split(b"=")[1])] = pid
        assert set(ranks) == {0, 1}, f"tasks found: {ranks}"
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        while True:
            q = run(["squeue", "-h", "-j", job, "-o", "%T"], env, check=False).stdout.strip()
            if q in ("", "FAILED", "COMPLETED", "CANCELLED") or "FAIL" in q:
                break
            if time.time() - t0 > 60:
                sys.exit(f"FAILED: job {job} still {q} 60 s after a task was killed\n" + slurm.logs())
            time.sleep(0.2)
        state = run(["scontrol", "show", "job", job], env, check=False).stdout
        m = re.search(r"JobState=(\S+).*?ExitCode=(\S+)", state, re.S)
        print(f"killed task 1: job ended after {time.time() - t0:.1f} s, {m.group(1) if m else state.strip()[:80]}")
        assert m and m.group(1) != "COMPLETED", state
        time.sleep(1)
        assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
                       for pid in ranks.values()), "a task survived"
        cks = sorted(int(f[11:-3]) for f in os.listdir(out) if re.fullmatch(r"checkpoint-\d+\.h5", f))
        last = cks[-1]
        script = edited_script(tmp, "run3.sbatch", out, TINY + ["--max_train_steps", str(last + 3), "--checkpointing_steps",
                                                                 "3", "--resume_from_checkpoint", "latest"])
        p = run(SBATCH + ["--wait", f"--output={tmp}/run3.log", script], env, timeout=300, check=False)
        log = open(f"{tmp}/run3.log", errors="replace").read()
        assert p.returncode == 0, f"resubmission failed ({p.returncode})\n{log}"
        assert f"at step {last}" in log, log
        assert os.path.exists(f"{out}/lora.safetensors")
        print(f"resubmitted: resumed from checkpoint-{last}.h5 and finished")
    finally:
        if slurm:
            slurm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
    print("OK")
