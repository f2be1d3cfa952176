"""Data-parallel training over c10d Gloo on the CPU, launched the way torchrun and srun do (one
process per rank, rendezvous through MASTER_ADDR/MASTER_PORT):

- 2 and 3 ranks end with the weights of one process with the same global batch (within 1e-6),
  with gradient accumulation, activation checkpointing and bf16 autocast; loss, gradient
  norm, loader position and validation loss agree step for step;
- a run checkpointed on 2 ranks resumes on 3 with the same global sample order;
- ZeRO-1 (distributed.shard_optimizer) on 2 and 3 ranks equals one process, and its
  checkpoint (the full optimizer state, gathered) resumes without sharding on 3 ranks;
- a rank whose peers never start fails the rendezvous with a clear error after the timeout;
- a rank that dies (SIGKILL) or hangs (SIGSTOP) makes the others exit non-zero within
  distributed.timeout_s, naming the failed collective;
- an out-of-memory error on one rank makes every rank back off together;
- a stop signal delivered to one rank stops all of them at the same step, resumably;
- `torchrun --no-python` launches it.

The reference is the single-process trainer, itself checked against PyTorch by test_train.
Run by ctest (`distributed.*`), which sets GPT2FT_BIN."""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest

import train_reference as ref
from common import WorkDirTest

BIN = os.environ.get("GPT2FT_BIN", "")
VENV_BIN = os.path.dirname(sys.executable)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(model_dir, train_glob, val_glob):
    # Small lr and few steps, as in test_train's accumulation test. AdamW's eps is 1e-6 rather
    # than 1e-8: Adam turns a gradient that is pure rounding noise (the key bias, which softmax
    # ignores; a hidden unit that never activates) into an lr-sized step whose sign is the
    # noise's, so with eps 1e-8 two correct runs that only sum in another order differ by up to
    # ~1e-5 (measured: 7e-6 for 3 ranks in fp32, 8e-4 with bf16). With 1e-6 such steps shrink
    # ~100x while real gradients (>= 1e-4 here) move as before.
    return {
        "model": {"init_from": model_dir, "dropout": 0.0},
        "data": {"train": train_glob, "val": val_glob, "seq_len": 16, "num_workers": 2},
        "train": {"deterministic": True, "micro_batch_size": 2, "global_batch_size": 12, "max_steps": 4, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 1, "lr_schedule": "cosine", "weight_decay": 0.1, "grad_clip": 0.5, "eps": 1e-6,
                  "fused_adamw": "off"},
        "eval": {"max_sequences": 0},
        "checkpoint": {"every_steps": 0},
        "log": {"every_steps": 1, "progress": "lines"},
        "distributed": {"timeout_s": 30},
        "device": "cpu",
    }


def write_config(cfg, workdir, name):
    cfg = copy.deepcopy(cfg)
    cfg["output_dir"] = os.path.join(workdir, name)
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path, cfg["output_dir"]


def start_ranks(config_path, world, port, rank_env=None, extra=()):
    """One process per rank with torchrun's variables; rank_env[r] adds variables for rank r."""
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        env.update((rank_env or {}).get(r, {}))
        procs.append(subprocess.Popen([BIN, "--config", config_path, *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=300):
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank did not finish within the timeout (hang)")
        out.append((p.returncode, err))
    return out


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_rows(out):
    return [r for r in metrics(out) if "loss" in r]


def final_weight_diff(out, other):
    """Max |diff| between two run folders' final weights."""
    return ref.max_weight_diff(ref.load_file(os.path.join(out, "final", "model.safetensors")),
                               ref.load_file(os.path.join(other, "final", "model.safetensors")))


def crash_after(test, path, world, step):
    """Runs `world` ranks that all end abruptly (exit 137) after optimizer step `step`."""
    crash = {"GPT2FT_FAULT_CRASH_AFTER_STEP": str(step)}
    results = finish(start_ranks(path, world, free_port(), {r: crash for r in range(world)}))
    test.assertEqual([rc for rc, _ in results], [137] * world, results[0][1][-2000:])


def make_inputs(tmp):
    """A small model, two training shards and a validation shard under tmp; the base config."""
    model_dir = ref.make_model(os.path.join(tmp, "init"))
    ref.make_stream(os.path.join(tmp, "train_000000.bin"))
    ref.make_stream(os.path.join(tmp, "train_000001.bin"), n=1500, seed=1)
    ref.make_stream(os.path.join(tmp, "val_000000.bin"), n=1000, seed=2)
    return base_config(model_dir, os.path.join(tmp, "train_*.bin"), os.path.join(tmp, "val_*.bin"))


def val_losses(out):
    return [r["val_loss"] for r in metrics(out) if "val_loss" in r]


class DistributedTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cfg = make_inputs(cls.tmp)

    def run_single(self, cfg, name):
        weights, _, _ = ref.run_trainer(BIN, cfg, self.tmp, name)
        return weights, os.path.join(self.tmp, name)

    def run_ranks(self, cfg, world, name, rank_env=None, expect_rc=0):
        path, out = write_config(cfg, self.tmp, name)
        results = finish(start_ranks(path, world, free_port(), rank_env))
        for r, (rc, err) in enumerate(results):
            if expect_rc is not None:
                self.assertEqual(rc, expect_rc, f"{name}: rank {r} exited {rc}:\n{err[-3000:]}")
        return out, results

    def assert_same_run(self, out, ref_out, label, tol=1e-6, metric_tol=1e-5, val_tol=1e-6):
        diff = final_weight_diff(out, ref_out)
        rows, base = train_rows(out), train_rows(ref_out)
        self.assertEqual([r["step"] for r in rows], [r["step"] for r in base], label)
        # The same samples at every step: loader position, and the loss computed from them.
        self.assertEqual([(r["epoch"], r["samples_in_epoch"]) for r in rows],
                         [(r["epoch"], r["samples_in_epoch"]) for r in base], label)
        metric_diff = max(max(abs(a["loss"] - b["loss"]), abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"])
                          for a, b in zip(rows, base))
        v, vb = val_losses(out), val_losses(ref_out)
        self.assertEqual(len(v), len(vb), label)
        val_diff = max((abs(a - b) / b for a, b in zip(v, vb)), default=0.0)
        print(f"[distributed] {label}: weights max|diff| {diff:.3g}; loss/grad-norm {metric_diff:.3g}; "
              f"val loss (relative) {val_diff:.3g}")
        self.assertLessEqual(diff, tol, label)
        self.assertLess(metric_diff, metric_tol, label)
        self.assertLess(val_diff, val_tol, label)
        # The first step sees the same weights and the same samples: its loss is the same
        # whatever the rounding of later steps (a sample on the wrong rank changes it).
        self.assertLess(abs(rows[0]["loss"] - base[0]["loss"]), 1e-6 * abs(base[0]["loss"]), label)

    def test_two_and_three_ranks_equal_one_process(self):
        _, single = self.run_single(self.cfg, "single")
        for world, micro, ckpt in ((2, 2, "none"), (3, 2, "none"), (3, 4, "none"), (2, 3, "all")):
            cfg = copy.deepcopy(self.cfg)
            cfg["train"]["micro_batch_size"] = micro
            cfg["model"]["activation_checkpointing"] = ckpt
            name = f"ranks{world}_micro{micro}_{ckpt}"
            out, results = self.run_ranks(cfg, world, name)
            self.assertIn(f"accumulation {12 // (world * micro)} x {world} ranks = global batch 12", results[0][1])
            self.assert_same_run(out, single, f"{world} ranks x micro {micro} x accumulation "
                                               f"{12 // (world * micro)}, checkpointing {ckpt}")
            # Only rank 0 logs at info level and writes files.
            self.assertNotIn("info", results[1][1])
            self.assertTrue(os.path.isfile(os.path.join(out, "checkpoints", "step_00000004", "model.safetensors")))

    def test_bfloat16_autocast_two_ranks_equal_one_process(self):
        # In bf16 a rounding-level difference in the fp32 weights (the gradients summed in
        # another order) flips the bf16 rounding of a few inputs, and later steps move apart by
        # far more than in fp32, by an amount that depends on the CPU's bf16 kernels (AMX or
        # not): measured at 1e-7 on one machine, 8e-5 on another. The bound is therefore what
        # bf16 rounding alone does here: one process with another micro batch (the same samples
        # and maths, other roundings). A real fault (a sample on the wrong rank, a missing
        # average) moves the weights and the first loss by far more.
        cfg = copy.deepcopy(self.cfg)
        cfg["amp"] = {"dtype": "bfloat16"}
        _, single = self.run_single(cfg, "single_bf16")
        other = copy.deepcopy(cfg)
        other["train"]["micro_batch_size"] = 3
        _, other_split = self.run_single(other, "single_bf16_micro3")
        noise = final_weight_diff(other_split, single)
        rows, base = train_rows(other_split), train_rows(single)
        metric_noise = max(max(abs(a["loss"] - b["loss"]), abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"])
                           for a, b in zip(rows, base))
        val_noise = max(abs(a - b) / b for a, b in zip(val_losses(other_split), val_losses(single)))
        print(f"[distributed] bf16 rounding alone (micro 3 vs 2, one process): weights {noise:.3g}, "
              f"loss/grad-norm {metric_noise:.3g}, val loss (relative) {val_noise:.3g}")
        self.assertLess(noise, 5e-3, "bf16 rounding noise is small next to an lr-sized step")
        out, _ = self.run_ranks(cfg, 2, "ranks2_bf16")
        self.assert_same_run(out, single, "2 ranks, bf16 autocast", tol=max(1e-6, noise),
                             metric_tol=max(1e-5, 2 * metric_noise), val_tol=max(1e-6, 2 * val_noise))

    def test_checkpoint_of_two_ranks_resumes_on_three(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["train"]["max_steps"] = 8
        cfg["checkpoint"] = {"every_steps": 3, "keep_last": 2}
        _, single = self.run_single(cfg, "single_8")
        path, out = write_config(cfg, self.tmp, "two_then_three")
        crash_after(self, path, 2, 5)
        with open(os.path.join(out, "checkpoints", "step_00000003", "trainer_state.json")) as f:
            meta = json.load(f)
        self.assertEqual((meta["world_size"], meta["micro_batch"]), (2, 2))
        results = finish(start_ranks(path, 3, free_port()))
        for r, (rc, err) in enumerate(results):
            self.assertEqual(rc, 0, f"rank {r}:\n{err[-3000:]}")
        self.assertIn("written by 2 rank(s), this run has 3", results[0][1])
        self.assertIn("resumed from", results[0][1])
        # metrics.jsonl holds steps 1..5 of the first attempt and 4..8 of the resumed one.
        rows = train_rows(out)
        resumed = [r for r in rows[5:]]
        self.assertEqual([r["step"] for r in resumed], [4, 5, 6, 7, 8])
        base = {r["step"]: r for r in train_rows(single)}
        for r in resumed:
            self.assertEqual((r["epoch"], r["samples_in_epoch"]), (base[r["step"]]["epoch"],
                                                                   base[r["step"]]["samples_in_epoch"]))
            self.assertLess(abs(r["loss"] - base[r["step"]]["loss"]), 1e-5, r["step"])
        diff = final_weight_diff(out, single)
        print(f"[distributed] 2 ranks to step 5, resumed from step 3 on 3 ranks: weights max|diff| {diff:.3g} "
              f"vs one uninterrupted process")
        self.assertLess(diff, 1e-6)

    def test_sharded_optimizer_equals_one_process_and_its_checkpoint_resumes_unsharded(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["train"]["max_steps"] = 6
        cfg["checkpoint"] = {"every_steps": 3, "keep_last": 2}
        _, single = self.run_single(cfg, "single_6")
        zero = copy.deepcopy(cfg)
        zero["distributed"]["shard_optimizer"] = True
        for world in (2, 3):
            out, _ = self.run_ranks(zero, world, f"zero1_{world}")
            self.assert_same_run(out, single, f"ZeRO-1 on {world} ranks")
        # A sharded run stops after step 4 (checkpoint at 3); 3 unsharded ranks finish it.
        path, out = write_config(zero, self.tmp, "zero1_then_plain")
        crash_after(self, path, 2, 4)
        state = ref.load_file(os.path.join(out, "checkpoints", "step_00000003", "trainer_state.safetensors"))
        plain = ref.load_file(os.path.join(single, "checkpoints", "step_00000006", "trainer_state.safetensors"))
        self.assertEqual({k for k in state if k.startswith("adamw.")}, {k for k in plain if k.startswith("adamw.")})
        unsharded = copy.deepcopy(zero)
        unsharded["distributed"]["shard_optimizer"] = False
        path, _ = write_config(unsharded, self.tmp, "zero1_then_plain")
        results = finish(start_ranks(path, 3, free_port()))
        self.assertEqual([rc for rc, _ in results], [0, 0, 0], results[0][1][-2000:])
        diff = final_weight_diff(out, single)
        print(f"[distributed] ZeRO-1 on 2 ranks to step 4, resumed from step 3 unsharded on 3 ranks: weights "
              f"max|diff| {diff:.3g} vs one process")
        self.assertLess(diff, 1e-6)

    def start_endless_run(self, name, world, timeout_s):
        """`world` ranks training (almost) forever, once they logged step 3."""
        cfg = copy.deepcopy(self.cfg)
        cfg["train"]["max_steps"] = 100000
        cfg["distributed"]["timeout_s"] = timeout_s
        path, out = write_config(cfg, self.tmp, name)
        procs = start_ranks(path, world, free_port())
        self.wait_for_step(procs, out, 3)
        return procs

    def test_a_killed_rank_makes_the_others_exit(self):
        procs = self.start_endless_run("killed", 3, 20)
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        results = finish(procs, timeout=120)
        elapsed = time.monotonic() - start
        print(f"[distributed] rank 1 of 3 SIGKILLed: the others exited {results[0][0]}, {results[2][0]} "
              f"after {elapsed:.1f} s (timeout 20 s)")
        for r in (0, 2):
            rc, err = results[r]
            self.assertEqual(rc, 1, err[-2000:])
            self.assertIn("distributed", err.splitlines()[-1])
            self.assertNotIn("Traceback", err)
        self.assertLess(elapsed, 20 + 30)

    def test_a_hung_rank_makes_the_others_exit_after_the_timeout(self):
        procs = self.start_endless_run("hung", 2, 8)
        procs[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        try:
            rc, err = finish(procs[:1], timeout=120)[0]
        finally:
            procs[1].kill()
            procs[1].communicate()
        elapsed = time.monotonic() - start
        print(f"[distributed] rank 1 of 2 SIGSTOPped: rank 0 exited {rc} after {elapsed:.1f} s (timeout 8 s)")
        self.assertEqual(rc, 1, err[-2000:])
        self.assertIn("Timed out", err.splitlines()[-1])
        self.assertLess(elapsed, 8 + 30)

    def wait_for_step(self, procs, out, step):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                errs = [p.communicate()[1][-1500:] for p in procs if p.poll() is not None]
                raise AssertionError(f"a rank exited early:\n{errs}")
            try:
                if len(train_rows(out)) >= step:
                    return
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"no step {step} within 120 s")

    def test_a_rank_whose_peers_never_come_fails_the_rendezvous_clearly(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["distributed"]["timeout_s"] = 3
        path, _ = write_config(cfg, self.tmp, "lonely")
        port = free_port()
        for rank in (0, 1):  # rank 0 waits for a worker that never connects; rank 1 for a server that is not there
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            start = time.monotonic()
            r = subprocess.run([BIN, "--config", path], env=env, capture_output=True, text=True, timeout=120)
            elapsed = time.monotonic() - start
            last = r.stderr.strip().splitlines()[-1]
            print(f"[distributed] rank {rank} of 2 alone: exit {r.returncode} after {elapsed:.1f} s: {last[:160]}")
            self.assertEqual(r.returncode, 1, r.stderr[-2000:])
            self.assertIn(f"rendezvous at 127.0.0.1:{port} failed on rank {rank} of 2", last)
            self.assertIn("distributed.timeout_s", last)
            self.assertLess(elapsed, 3 + 30)

    def test_out_of_memory_on_one_rank_backs_off_every_rank(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["train"].update({"micro_batch_size": 6, "max_steps": 3})
        out, results = self.run_ranks(cfg, 2, "oom_one_rank", rank_env={1: {"GPT2FT_FAULT_OOM_ABOVE_MICRO": "3"}})
        self.assertIn("OUT OF MEMORY", results[0][1])  # rank 0 did not fail itself, yet backs off
        self.assertIn("another rank ran out of memory", results[0][1])
        self.assertEqual({r["micro_batch"] for r in train_rows(out)}, {3})
        cfg["train"]["micro_batch_size"] = 3
        clean, _ = self.run_ranks(cfg, 2, "oom_clean")
        self.assert_same_run(out, clean, "OOM on rank 1 of 2, back-off 6 -> 3", tol=0.0)

    def test_a_signal_to_one_rank_stops_all_at_the_same_step(self):
        cfg = copy.deepcopy(self.cfg)
        cfg["train"]["max_steps"] = 60
        _, single = self.run_single(cfg, "single_60")
        path, out = write_config(cfg, self.tmp, "signalled")
        procs = start_ranks(path, 2, free_port())
        self.wait_for_step(procs, out, 2)
        procs[1].send_signal(signal.SIGUSR1)
        results = finish(procs)
        self.assertEqual([rc for rc, _ in results], [76, 76], results[0][1][-2000:])
        stopped_at = train_rows(out)[-1]["step"]
        self.assertIn(f"after step {stopped_at}", results[0][1].splitlines()[-1])
        self.assertLess(stopped_at, 60)
        results = finish(start_ranks(path, 2, free_port()))
        self.assertEqual([rc for rc, _ in results], [0, 0], results[0][1][-2000:])
        diff = final_weight_diff(out, single)
        print(f"[distributed] SIGUSR1 to rank 1: both stopped after step {stopped_at} (exit 76); resumed run vs "
              f"one process: weights max|diff| {diff:.3g}")
        self.assertLess(diff, 1e-5)

    def test_torchrun_launches_it(self):
        torchrun = os.path.join(VENV_BIN, "torchrun")
        if not os.path.exists(torchrun):
            self.skipTest(f"torchrun not found next to {sys.executable}")
        _, single = self.run_single(self.cfg, "single_torchrun")
        path, out = write_config(self.cfg, self.tmp, "torchrun")
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        r = subprocess.run([torchrun, "--no-python", "--nproc-per-node", "2", "--master-port", str(free_port()), BIN,
                            "--config", path], capture_output=True, text=True, timeout=300, env=env)
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("launcher torchrun", r.stderr)
        # torchrun sets OMP_NUM_THREADS=1, so CPU kernels sum in another order than the
        # reference run: compare with the looser tolerance of test_train's split test.
        self.assert_same_run(out, single, "torchrun --nproc-per-node 2", tol=1e-5)


if __name__ == "__main__":
    unittest.main()
