"""Resilience: exact resume after a crash (bitwise), resume with half the micro batch, in-process
OOM back-off, the OOM restart path (exit 75), SIGUSR1 (exit 76), crash safety of checkpoint
writing under many kill points and random SIGKILLs, and damaged or mismatched checkpoints.
Run by ctest (`resilience.*`), which sets GPT2FT_BIN."""
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import time
import unittest

import numpy as np
from safetensors.numpy import load_file

import train_reference as ref
from common import WorkDirTest

BIN = os.environ.get("GPT2FT_BIN", "")


def config(model_dir, glob, out, **train):
    c = {
        "model": {"init_from": model_dir, "dropout": 0.1},
        "data": {"train": glob, "seq_len": 16, "num_workers": 2},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2,
                  "fused_adamw": "off", "deterministic": True},  # runs of two processes compared bitwise
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "log": {"every_steps": 1, "progress": "lines"},
        "output_dir": out,
        "device": "cpu",
    }
    c["train"].update(train)
    return c


def run(cfg, workdir, name, env=None, extra=()):
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([BIN, "--config", path, *extra], capture_output=True, text=True, env=e, timeout=600)


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def latest_state(out):
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        name = f.read().strip()
    d = os.path.join(out, "checkpoints", name)
    with open(os.path.join(d, "trainer_state.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(d, "trainer_state.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def micro_batches(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["micro_batch"] for line in f if '"micro_batch"' in line]


class ResilienceTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"))
        ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"))
        cls.glob = os.path.join(cls.tmp, "train_*.bin")
        cls.straight = os.path.join(cls.tmp, "straight")
        r = run(config(cls.model_dir, cls.glob, cls.straight), cls.tmp, "straight")
        assert r.returncode == 0, r.stderr

    def out(self, name):
        return os.path.join(self.tmp, f"{self._testMethodName}_{name}")

    def assert_same_as_straight(self, out):
        self.assertTrue(bitwise_equal(final_weights(out), final_weights(self.straight)), "weights differ")
        m1, s1 = latest_state(out)
        m2, s2 = latest_state(self.straight)
        self.assertEqual((m1["step"], m1["loader_epoch"], m1["loader_consumed"]),
                         (m2["step"], m2["loader_epoch"], m2["loader_consumed"]))
        self.assertTrue(bitwise_equal(s1, s2), "optimizer / RNG state differs")

    def test_crash_then_resume_is_bitwise_equal_to_a_straight_run(self):
        out = self.out("run")
        c = config(self.model_dir, self.glob, out)
        r = run(c, self.tmp, "crash", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "6"})
        self.assertEqual(r.returncode, 137, r.stderr)
        self.assertEqual(latest_state(out)[0]["step"], 4)
        r = run(c, self.tmp, "resume")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("resumed from", r.stderr)
        self.assert_same_as_straight(out)
        print("[resume] crash after step 6, resume from step 4: final weights and optimizer state bitwise equal")

    def test_resume_with_half_the_micro_batch(self):
        # lr 1e-3: Adam magnifies float rounding (different accumulation order) less; a wrong
        # sample order would still differ by ~1e-3.
        straight, out = self.out("straight"), self.out("run")
        c = config(self.model_dir, self.glob, out, lr=1e-3)
        c["model"]["dropout"] = 0.0
        s = copy.deepcopy(c)
        s["output_dir"] = straight
        self.assertEqual(run(s, self.tmp, "s").returncode, 0)
        self.assertEqual(run(c, self.tmp, "c", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "6"}).returncode, 137)
        r = run(c, self.tmp, "c2", extra=["--set", "train.micro_batch_size=2"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(micro_batches(out)[-1], 2)
        diff = max_diff(final_weights(out), final_weights(straight))
        print(f"[resume] micro batch 4 -> 2 after step 4: weights max|diff| {diff:.3g}")
        self.assertLess(diff, 1e-6)
        self.assertEqual(latest_state(out)[0]["loader_consumed"], latest_state(straight)[0]["loader_consumed"])

    def no_dropout_config(self, out, micro):
        c = config(self.model_dir, self.glob, out, micro_batch_size=micro)
        c["model"]["dropout"] = 0.0
        return c

    def clean_run(self, micro):
        """A run without faults at this micro batch (dropout 0, so any split compares)."""
        clean = self.out("clean")
        self.assertEqual(run(self.no_dropout_config(clean, micro), self.tmp, "clean").returncode, 0)
        return clean

    def test_out_of_memory_backs_off_in_process_keeping_the_global_batch(self):
        clean, out = self.clean_run(2), self.out("run")
        c = self.no_dropout_config(out, 8)
        r = run(c, self.tmp, "backoff", env={"GPT2FT_FAULT_OOM_ABOVE_MICRO": "2"})
        self.assertEqual(r.returncode, 0, r.stderr)
        log = [line for line in r.stderr.splitlines() if "OUT OF MEMORY" in line]
        print("[backoff] " + "\n[backoff] ".join(log))
        self.assertEqual(len(log), 2)  # 8 -> 4 -> 2
        self.assertIn("backing off to micro batch 2 x accumulation 4 (global batch 8 unchanged)", log[1])
        self.assertEqual(set(micro_batches(out)), {2})
        diff = max_diff(final_weights(out), final_weights(clean))
        print(f"[backoff] weights vs a clean 2x4 run: max|diff| {diff:.3g}")
        self.assertLess(diff, 1e-6)
        m1, m2 = latest_state(out)[0], latest_state(clean)[0]
        self.assertEqual((m1["loader_epoch"], m1["loader_consumed"]), (m2["loader_epoch"], m2["loader_consumed"]))

    def test_out_of_memory_in_evaluation_halves_only_the_evaluation_batch(self):
        val = os.path.join(self.tmp, "val_000000.bin")
        if not os.path.exists(val):
            ref.make_stream(val, n=16 * 40 + 1, seed=3)
        outs = {}
        for name, env in (("clean", {}), ("oom", {"GPT2FT_FAULT_OOM_ABOVE_MICRO": "2"})):
            out = self.out(name)
            c = self.no_dropout_config(out, 2)
            c["data"]["val"] = val
            c["eval"] = {"batch_size": 8, "every_steps": 4, "max_sequences": 24}
            r = run(c, self.tmp, f"eval_{name}", env=env)
            self.assertEqual(r.returncode, 0, r.stderr)
            outs[name] = (out, r.stderr)
        out, err = outs["oom"]
        log = [line for line in err.splitlines() if "OUT OF MEMORY" in line]
        print("[eval oom] " + "\n[eval oom] ".join(log))
        # 8 -> 4 -> 2 windows per pass at the first evaluation, kept for the later ones.
        self.assertEqual(len(log), 2)
        self.assertTrue(all("during evaluation" in line for line in log))
        self.assertEqual(set(micro_batches(out)), {2})  # training never backed off

        def val_losses(o):
            with open(os.path.join(o, "metrics.jsonl")) as f:
                return [json.loads(line)["val_loss"] for line in f if '"val_loss"' in line]

        got, want = val_losses(out), val_losses(outs["clean"][0])
        print(f"[eval oom] val losses {got} vs {want} without the fault")
        self.assertEqual(len(got), 3)
        self.assertEqual(len(got), len(want))
        for a, b in zip(got, want):
            self.assertLess(abs(a - b) / b, 1e-6)
        self.assertTrue(bitwise_equal(final_weights(out), final_weights(outs["clean"][0])))

    def test_checkpoint_and_exit_then_restart_with_the_smaller_micro_batch(self):
        clean, out = self.clean_run(4), self.out("run")
        c = self.no_dropout_config(out, 8)
        c["oom"] = {"policy": "checkpoint_and_exit"}
        env = {"GPT2FT_FAULT_OOM_ABOVE_MICRO": "4"}
        r = run(c, self.tmp, "exit", env=env)
        print(f"[oom exit] code {r.returncode}: {r.stderr.strip().splitlines()[-1]}")
        self.assertEqual(r.returncode, 75)
        self.assertIn("continues with micro batch 4", r.stderr)
        r = run(c, self.tmp, "again", env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(set(micro_batches(out)), {4})
        self.assertLess(max_diff(final_weights(out), final_weights(clean)), 1e-6)
        # A micro batch that may not go lower (exit 77: a rerun would fail the same way, so Slurm
        # must not requeue it; plan's advice for this device in the message), and the "fail"
        # policy: the message points to plan's other levers.
        for name, oom, code in (("floor", {"min_micro_batch_size": 8}, 77),
                                ("floor, checkpoint_and_exit", {"min_micro_batch_size": 8, "policy": "checkpoint_and_exit"}, 77),
                                ("fail", {"policy": "fail"}, 1)):
            c = self.no_dropout_config(self.out(name.replace(", ", "-")), 8)
            c["oom"] = oom
            r = run(c, self.tmp, name.replace(", ", "-"), env=env)
            self.assertEqual(r.returncode, code, r.stderr[-2000:])
            self.assertIn("gpt2-finetune plan --config <this config>` lists what would make it fit", r.stderr)
            self.assertNotIn("Traceback", r.stderr)
            if code == 77:
                self.assertIn("cannot fit even at the smallest micro batch", r.stderr)
                self.assertIn("plan's advice for", r.stderr)
                print(f"[oom floor] {name}: exit 77: {r.stderr.strip().splitlines()[-1][-300:]}")

    def test_sigusr1_checkpoints_and_exits_76_then_resume_completes(self):
        out = self.out("run")
        c = config(self.model_dir, self.glob, out, max_steps=400)
        c["checkpoint"]["every_steps"] = 0
        path = os.path.join(self.tmp, "sig.json")
        with open(path, "w") as f:
            json.dump(c, f)
        p = subprocess.Popen([BIN, "--config", path], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        metrics = os.path.join(out, "metrics.jsonl")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5):
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=120)
        print(f"[signal] code {p.returncode}: {err.strip().splitlines()[-1]}")
        self.assertEqual(p.returncode, 76)
        self.assertIn("User defined signal 1", err)
        stopped_at = latest_state(out)[0]["step"]
        self.assertGreaterEqual(stopped_at, 5)
        self.assertLess(stopped_at, 400)
        r = run(c, self.tmp, "sig2")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(latest_state(out)[0]["step"], 400)

    def test_a_stop_signal_is_honoured_inside_a_long_step(self):
        # 1024 micro batches a step: a signal must not wait for the step's end. The step in
        # progress is dropped and redone on resume, so the result equals a straight run.
        straight, out = self.out("straight"), self.out("run")
        c = self.no_dropout_config(out, 1)
        c["train"].update({"global_batch_size": 1024, "max_steps": 2})
        c["checkpoint"]["every_steps"] = 0
        s = copy.deepcopy(c)
        s["output_dir"] = straight
        self.assertEqual(run(s, self.tmp, "long_straight").returncode, 0)
        path = os.path.join(self.tmp, "long.json")
        with open(path, "w") as f:
            json.dump(c, f)
        p = subprocess.Popen([BIN, "--config", path], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)
        sent = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        waited = time.monotonic() - sent
        print(f"[signal] SIGTERM inside a 1024-micro-batch step: exit {p.returncode} after {waited:.2f} s: "
              f"{err.strip().splitlines()[-1]}")
        self.assertEqual(p.returncode, 76, err[-2000:])
        self.assertLess(waited, 10)
        self.assertIn("Terminated", err)
        r = run(c, self.tmp, "long_resume")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertTrue(bitwise_equal(final_weights(out), final_weights(straight)), "resumed run differs")

    def test_time_limit_checkpoints_and_exits_76(self):
        out = self.out("run")
        c = config(self.model_dir, self.glob, out, max_steps=100000, time_limit=2.0)
        c["checkpoint"]["every_steps"] = 0
        r = run(c, self.tmp, "limit")
        self.assertEqual(r.returncode, 76, r.stderr[-2000:])
        self.assertIn("train.time_limit", r.stderr)
        self.assertGreater(latest_state(out)[0]["step"], 0)

    def test_crash_at_any_point_of_checkpoint_writing_leaves_a_resumable_run(self):
        outcomes = []
        c = config(self.model_dir, self.glob, "", max_steps=12)
        c["checkpoint"]["every_steps"] = 2
        trials = [("kill point", k) for k in range(1, 16)]
        rng = random.Random(0)
        trials += [("SIGKILL", rng.uniform(0.3, 2.0)) for _ in range(6)]
        for i, (kind, where) in enumerate(trials):
            out = self.out(f"t{i}")
            c["output_dir"] = out
            if kind == "kill point":
                r = run(c, self.tmp, f"t{i}", env={"GPT2FT_FAULT_CRASH_IN_CHECKPOINT": str(where)})
                crashed = r.returncode == 137
            else:
                path = os.path.join(self.tmp, f"t{i}.json")
                with open(path, "w") as f:
                    json.dump(c, f)
                p = subprocess.Popen([BIN, "--config", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(where)
                p.kill()
                crashed = p.wait() == -signal.SIGKILL
            r = run(c, self.tmp, f"t{i}r")
            self.assertEqual(r.returncode, 0, f"{kind} {where}: resume failed\n{r.stderr[-2000:]}")
            self.assert_same_as_straight(out)
            leftovers = [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".tmp")]
            self.assertEqual(leftovers, [])
            outcomes.append(crashed)
        print(f"[crash safety] {len(trials)} trials ({sum(outcomes)} crashed mid-run, the rest finished first): "
              f"every resume succeeded and ended bitwise equal to the straight run")
        self.assertGreaterEqual(sum(outcomes), 15)

    def test_damaged_or_mismatched_checkpoints_are_clear_errors(self):
        base = self.out("base")
        c = config(self.model_dir, self.glob, base, max_steps=4)
        self.assertEqual(run(c, self.tmp, "base").returncode, 0)
        ckpt = os.path.join(base, "checkpoints", "step_00000004")

        def damaged(name, mutate):
            out = self.out(name)
            shutil.copytree(base, out)
            mutate(os.path.join(out, "checkpoints", "step_00000004"), out)
            return out

        def truncate(d, _):
            p = os.path.join(d, "trainer_state.safetensors")
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)

        def garble(d, _):
            with open(os.path.join(d, "trainer_state.json"), "w") as f:
                f.write("{ garbled")

        def dangling(_, out):
            with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
                f.write("step_00009999\n")

        other_model = ref.make_model(os.path.join(self.tmp, "other_model"), n_embd=48, n_head=3)
        cases = [
            ("truncated", damaged("truncated", truncate), {}, ["trainer_state.safetensors", "damaged"]),
            ("garbled", damaged("garbled", garble), {}, ["trainer_state.json", "not valid JSON"]),
            ("dangling", damaged("dangling", dangling), {}, ["latest", "step_00009999", "not a checkpoint folder"]),
            ("other_shape", None, {"model": {"init_from": other_model, "dropout": 0.1}},
             ["holds a model with 2 layers, 2 heads, 32 channels", "the config builds 2, 3, 48"]),
            ("global_batch", None, {"train": {**c["train"], "global_batch_size": 16}},
             ["global batch of 8 sequences", "asks for 16"]),
        ]

        def edit_state(**changes):
            def mutate(d, _):
                p = os.path.join(d, "trainer_state.json")
                with open(p) as f:
                    meta = json.load(f)
                for k, v in changes.items():
                    if v is None:
                        del meta[k]
                    else:
                        meta[k] = v
                with open(p, "w") as f:
                    json.dump(meta, f)
            return mutate

        def flip_byte(file, where):
            def mutate(d, _):
                p = os.path.join(d, file)
                with open(p, "r+b") as f:
                    f.seek(int(os.path.getsize(p) * where))
                    b = f.read(1)
                    f.seek(-1, 1)
                    f.write(bytes([b[0] ^ 0x10]))
            return mutate

        def deep_json(d, _):
            with open(os.path.join(d, "trainer_state.json"), "w") as f:
                f.write("[" * 100000 + "]" * 100000)

        # Every field read from a checkpoint is checked, and every file's bytes.
        for name, mutate, fragments in (
                ("step_negative", edit_state(step=-1), ['"step" is -1', "damaged"]),
                ("step_huge", edit_state(step=2 ** 62), ['"step" is 4611686018427387904']),
                # A float out of int64's range: refused by type before any conversion (UB; the
                # sanitizer run catches a conversion).
                ("step_float_huge", edit_state(step=1.5e51), ['"step" is 1.5e+51', "expected an integer"]),
                ("world_size_zero", edit_state(world_size=0), ['"world_size" is 0']),
                ("micro_batch_zero", edit_state(micro_batch=0), ['"micro_batch" is 0']),
                ("consumed_negative", edit_state(loader_consumed=-5), ['"loader_consumed" is -5']),
                ("consumed_huge", edit_state(loader_consumed=2 ** 62), ['"loader_consumed" is 4611686018427387904']),
                ("epoch_negative", edit_state(loader_epoch=-1), ['"loader_epoch" is -1']),
                ("consumed_past_the_data", edit_state(loader_consumed=100000),
                 ["loader position", "outside the data"]),
                ("no_world_size", edit_state(world_size=None), ['missing "world_size"']),
                ("no_config", edit_state(config=None), ['missing "config"']),
                ("no_checksums", edit_state(checksums=None), ['missing "checksums"']),
                ("optimizer_flipped", flip_byte("trainer_state.safetensors", 0.7),
                 ["trainer_state.safetensors: checksum", "damaged"]),
                ("weights_flipped", flip_byte("model.safetensors", 0.5), ["model.safetensors: checksum", "damaged"]),
                ("deep_json", deep_json, ["trainer_state.json", "nested deeper than 64"])):
            cases.append((name, damaged(name, mutate), {}, fragments))
        for name, out, patch, fragments in cases:
            with self.subTest(case=name):
                cc = copy.deepcopy(c)
                cc.update(patch)
                if out is None:
                    out = self.out(name)
                    cc["checkpoint"]["resume"] = ckpt
                cc["output_dir"] = out
                before = {f: open(os.path.join(ckpt, f), "rb").read() for f in os.listdir(ckpt)}
                r = run(cc, self.tmp, name)
                self.assertEqual(r.returncode, 1, r.stderr)
                line = r.stderr.strip().splitlines()[-1]
                print(f"[bad checkpoint] {name}: {line}")
                for fragment in fragments:
                    self.assertIn(fragment, line)
                self.assertEqual(before, {f: open(os.path.join(ckpt, f), "rb").read() for f in os.listdir(ckpt)})


if __name__ == "__main__":
    unittest.main()
