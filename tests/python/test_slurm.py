"""A real Slurm: scripts/slurm/local-cluster.sh brings up munged, slurmctld and slurmd on this
machine (Debian's slurm-wlm and munge, installed by scripts/setup.sh), and the project's own
sbatch script is submitted unchanged except for the task count (2 tasks, CPU, Gloo):

- the job runs 2 ranks through srun and ends with the weights of one process;
- preemption: USR1 to the job's tasks (what --signal=USR1@120 sends before the time limit)
  makes every rank checkpoint and exit 76; the script requeues the job, which resumes at the
  next sample and finishes;
- out of memory with oom.policy "checkpoint_and_exit": exit 75, the script requeues with
  --set train.micro_batch_size=<the smaller one>, and the job finishes.

Skipped, with the reason, where a cluster cannot run (not root, packages missing, the daemons
do not come up). Run by ctest (`slurm.*`), which sets GPT2FT_BIN."""
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import time
import unittest

import train_reference as ref
from common import WorkDirTest
from test_distributed import final_weight_diff, make_inputs, train_rows

BIN = os.environ.get("GPT2FT_BIN", "")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLUSTER_SCRIPT = os.path.join(ROOT, "scripts", "slurm", "local-cluster.sh")
SBATCH_SCRIPT = os.path.join(ROOT, "scripts", "slurm", "train-1node.sbatch")


def two_free_ports():
    for base in range(16817, 17800, 2):
        ok = True
        for port in (base, base + 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free port pair for slurmctld/slurmd")


class SlurmTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cluster = None
        if os.geteuid() != 0:
            cls.skip_reason = "a local Slurm cluster needs root (slurmd starts jobs as their user)"
            return
        missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(t)]
        if missing:
            cls.skip_reason = f"not installed: {', '.join(missing)} (scripts/setup.sh installs slurm-wlm and munge)"
            return
        cluster = os.path.join(cls.tmp, "cluster")
        env = dict(os.environ, GPT2FT_SLURM_PORT=str(two_free_ports()))
        r = subprocess.run(["bash", CLUSTER_SCRIPT, "start", cluster], capture_output=True, text=True, env=env,
                           timeout=180)
        if r.returncode != 0:
            cls.skip_reason = f"the local Slurm cluster did not start (exit {r.returncode}): {r.stderr[-1500:]}"
            subprocess.run(["bash", CLUSTER_SCRIPT, "stop", cluster], capture_output=True)
            return
        cls.skip_reason = None
        cls.cluster = cluster
        cls.slurm_env = dict(os.environ, SLURM_CONF=os.path.join(cluster, "slurm.conf"), GPT2FT_ROOT=ROOT,
                             GPT2FT_BIN=BIN)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            cls.slurm_env.pop(k, None)
        cls.cfg = make_inputs(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        if cls.cluster:
            subprocess.run(["bash", CLUSTER_SCRIPT, "stop", cls.cluster], capture_output=True)
        super().tearDownClass()

    def setUp(self):
        if self.skip_reason:
            self.skipTest(self.skip_reason)

    def submit(self, cfg, name, env=None):
        cfg = copy.deepcopy(cfg)
        cfg["output_dir"] = os.path.join(self.tmp, name)
        path = os.path.join(self.tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        log = os.path.join(self.tmp, f"{name}.log")
        e = dict(self.slurm_env)
        e.update(env or {})
        # The GPU script as users submit it; only the task shape is fitted to this machine.
        r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1",
                            "--time=10",
                            f"--output={log}", f"--chdir={self.tmp}", SBATCH_SCRIPT, path],
                           capture_output=True, text=True, env=e, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip().split(";")[0], cfg["output_dir"], log

    def job_field(self, job, field):
        r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=self.slurm_env)
        m = re.search(rf"\b{field}=(\S+)", r.stdout)
        return m.group(1) if m else None

    def wait_for_job(self, job, log, restarts=0, timeout=300):
        """The job's final state, once it ran `restarts` requeues. Around a requeue slurmctld can
        briefly show FAILED or COMPLETED before the job is pending again, so a final state must
        hold for three polls in a row and come after the expected number of restarts."""
        start = time.monotonic()
        deadline = start + timeout
        seen, streak = None, 0
        requeued = {}  # restart count -> when the job was first seen pending with it
        self.history = []  # (seconds, state, reason, restarts) at each change, for failure messages
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            now = (state, self.job_field(job, "Reason"), self.job_field(job, "Restarts"))
            if not self.history or self.history[-1][1:] != now:
                self.history.append((round(time.monotonic() - start, 1), *now))
            done = state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
            streak = streak + 1 if done and state == seen else (1 if done else 0)
            seen = state
            # A final state that lasts 20 polls without the expected requeue is final too.
            if done and (streak >= 20 or (streak >= 3 and int(self.job_field(job, "Restarts") or 0) >= restarts)):
                return state
            if state == "PENDING":
                requeued.setdefault(now[2], time.monotonic())
            if (state == "PENDING" and now[1] == "BeginTime" and now[2] != "0"
                    and time.monotonic() - requeued[now[2]] >= 3):
                # slurmctld delays a requeued job's start by about two minutes; skip most of the
                # wait, but not the first seconds: the requeue revoked the job's credential on
                # slurmd, which refuses a relaunch whose new credential carries the same
                # second ("Killing non-startable batch JobId=N: Job credential revoked", and
                # the job ends FAILED). Slurm's own delay is what normally prevents that.
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=self.slurm_env,
                               capture_output=True)
            time.sleep(1)
        subprocess.run(["scancel", job], env=self.slurm_env)
        with open(log) as f:
            self.fail(f"job {job} did not finish within {timeout} s; states {self.history}:\n{f.read()[-3000:]}")

    def read_log(self, log):
        with open(log) as f:
            return f.read()

    def cluster_logs(self, job):
        """The lines of slurmctld's and slurmd's logs about `job`, for failure messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            try:
                with open(os.path.join(self.cluster, name)) as f:
                    lines = [line.rstrip() for line in f if f"JobId={job}" in line or f"job {job}" in line
                             or f"StepId={job}." in line or f"job_id {job}" in line]
            except OSError as e:
                lines = [str(e)]
            out.append(f"--- {name} ({len(lines)} lines about job {job}, last 40):\n" + "\n".join(lines[-40:]))
        return "\n".join(out)

    def test_sbatch_runs_two_ranks_through_srun(self):
        ref.run_trainer(BIN, self.cfg, self.tmp, "single")
        job, out, log = self.submit(self.cfg, "job")
        state = self.wait_for_job(job, log)
        text = self.read_log(log)
        self.assertEqual(state, "COMPLETED", f"states {self.history}\n{text[-3000:]}\n{self.cluster_logs(job)}")
        self.assertIn("launcher slurm", text)
        self.assertIn("x 2 ranks = global batch 12", text)
        self.assertIn("training finished", text)
        diff = final_weight_diff(out, os.path.join(self.tmp, "single"))
        print(f"[slurm] job {job}: 2 srun tasks, weights max|diff| vs one process {diff:.3g}")
        self.assertLess(diff, 1e-6)

    def test_preemption_signal_requeues_and_resumes(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["train"]["max_steps"] = 150
        ref.run_trainer(BIN, cfg, self.tmp, "single_150")
        job, out, log = self.submit(cfg, "preempted")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if len(train_rows(out)) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        else:
            self.fail(f"no training step logged:\n{self.read_log(log)[-3000:]}")
        # What Slurm's --signal=USR1@120 does before the time limit: USR1 to every task.
        subprocess.run(["scancel", "--signal=USR1", job], check=True, env=self.slurm_env)
        state = self.wait_for_job(job, log, restarts=1)
        text = self.read_log(log)
        self.assertEqual(state, "COMPLETED", f"states {self.history}\n{text[-3000:]}\n{self.cluster_logs(job)}")
        self.assertIn("stopped by a signal or the time limit (exit 76): checkpoint saved; requeueing", text)
        self.assertIn("resumed from", text)
        self.assertEqual(self.job_field(job, "Restarts"), "1")
        stopped = re.search(r"stopped by signal [^\n]* after step (\d+)", text)
        self.assertIsNotNone(stopped, text[-3000:])
        self.assertLess(int(stopped.group(1)), 150)
        diff = final_weight_diff(out, os.path.join(self.tmp, "single_150"))
        print(f"[slurm] job {job}: USR1 after step {stopped.group(1)}, requeued, resumed, completed; weights max|diff| "
              f"vs one uninterrupted process {diff:.3g}; job states {self.history}")
        self.assertLess(diff, 1e-5)

    def test_out_of_memory_requeues_with_a_smaller_micro_batch(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["train"]["micro_batch_size"] = 6
        cfg["oom"] = {"policy": "checkpoint_and_exit"}
        job, out, log = self.submit(cfg, "oom", env={"GPT2FT_FAULT_OOM_ABOVE_MICRO": "3"})
        state = self.wait_for_job(job, log, restarts=1)
        text = self.read_log(log)
        self.assertEqual(state, "COMPLETED", f"states {self.history}\n{text[-3000:]}\n{self.cluster_logs(job)}")
        self.assertIn("out of memory (exit 75): checkpoint saved; requeueing", text)
        self.assertIn("continuing with train.micro_batch_size=3", text)
        self.assertEqual({r["micro_batch"] for r in train_rows(out)}, {3})
        print(f"[slurm] job {job}: out of memory at micro 6 -> exit 75 -> requeued with micro 3 -> completed")


if __name__ == "__main__":
    unittest.main()
