"""Run tracking as HF Trainer users expect: TensorBoard event files read back by TensorBoard's
own EventAccumulator equal to metrics.jsonl at every logged step; a crash and resume that
TensorBoard shows without a duplicated step; the interval mean loss; best/ holding the lowest
validation loss and loading in transformers; early stopping at the right evaluation, also
across a resume; evaluation at epoch ends. Run by ctest (`tracking.*`), which sets GPT2FT_BIN."""
import copy
import glob
import json
import os
import subprocess
import sys

import torch
from transformers import GPT2LMHeadModel

import train_reference as ref
from common import WorkDirTest, reproducible_env
from test_instruction import train_patched

BIN = os.environ.get("GPT2FT_BIN", "")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAGS = {"train/loss": "loss", "train/learning_rate": "lr", "train/grad_norm": "grad_norm",
        "train/epoch": "fractional_epoch", "train/micro_batch": "micro_batch", "train/tokens_per_second": "tokens_per_s"}


def base_config(model_dir, train, val):
    return {
        "model": {"init_from": model_dir, "dropout": 0.0},
        "data": {"train": train, "val": val, "seq_len": 16, "shuffle": True, "num_workers": 2},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 24, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "deterministic": True},  # a resumed run's losses compared to 1e-6,
        "eval": {"every_steps": 4},
        "checkpoint": {"every_steps": 5},
        "log": {"every_steps": 1, "progress": "lines"},
        "device": "cpu",
    }


def rows_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_per_step(rows, key):
    by_step = {r["step"]: r for r in rows if key in r}
    return [by_step[s] for s in sorted(by_step)]


def tensorboard_scalars(out):
    """tag -> [(step, value)] as TensorBoard's own reader shows the run."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class RunTrackingTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"))
        ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"), n=1200)
        ref.make_stream(os.path.join(cls.tmp, "val_000000.bin"), n=20 * 16 + 1, seed=3)
        cls.cfg = base_config(cls.model_dir, os.path.join(cls.tmp, "train_*.bin"), os.path.join(cls.tmp, "val_*.bin"))

    def run_cfg(self, cfg, name, env=None, expect=0):
        return train_patched(self, cfg, name, env=env, expect=expect)

    def assert_tensorboard_equals_metrics(self, out, label):
        rows = rows_of(out)
        scalars = tensorboard_scalars(out)
        train, val = last_per_step(rows, "loss"), last_per_step(rows, "val_loss")
        for tag, key in TAGS.items():
            got = scalars[tag]
            steps = [s for s, _ in got]
            self.assertEqual(steps, sorted(set(steps)), f"{label}: {tag} has a step twice")
            self.assertEqual(steps, [r["step"] for r in train], f"{label}: {tag}")
            for (s, v), r in zip(got, train):
                self.assertAlmostEqual(v, r[key], delta=1e-6 * max(1.0, abs(r[key])), msg=f"{label}: {tag} step {s}")
        self.assertEqual([(s, round(v, 5)) for s, v in scalars["eval/loss"]],
                         [(r["step"], round(r["val_loss"], 5)) for r in val], label)
        return scalars

    def test_tensorboard_reads_every_scalar_equal_to_metrics_and_a_resume_has_no_duplicate_step(self):
        # A first run in the folder with another learning rate and no checkpoint (a new run never
        # writes among another run's checkpoints), then this one started afresh
        # (checkpoint.resume "none"): TensorBoard shows this run's steps only.
        earlier = copy.deepcopy(self.cfg)
        earlier["train"]["lr"] = 1e-3
        earlier["checkpoint"].update({"every_steps": 0, "at_end": False})
        first, _ = self.run_cfg(earlier, "straight")
        # ... whose event file carries a later timestamp, one that sorts before ours as text
        # (10000000000 < 9999999999): TensorBoard reads files in name order.
        tb = os.path.join(first, "tensorboard")
        for i, name in enumerate(sorted(os.listdir(tb))):
            os.rename(os.path.join(tb, name), os.path.join(tb, f"events.out.tfevents.9999999999.elsewhere.1.{i}"))
        again = copy.deepcopy(self.cfg)
        again["checkpoint"]["resume"] = "none"
        out, _ = self.run_cfg(again, "straight")
        self.assert_tensorboard_equals_metrics(out, "straight, started afresh over an earlier run")
        rows = rows_of(out)
        for r in (r for r in rows if "loss" in r):
            for key in ("time", "fractional_epoch", "global_batch", "tokens_seen"):
                self.assertIn(key, r)
            self.assertEqual(r["tokens_seen"], r["step"] * 8 * 16)
        # A crash after step 13 (last checkpoint at 10): the resumed process logs 11..24 again.
        crashed, _ = self.run_cfg(self.cfg, "crash", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "13"}, expect=137)
        self.run_cfg(self.cfg, "crash")
        files = glob.glob(os.path.join(crashed, "tensorboard", "events.out.tfevents.*"))
        self.assertEqual(len(files), 2, "a resumed run appends a new event file")
        rows = rows_of(crashed)
        resumed = [r for r in rows if "resumed" in r]
        self.assertEqual(len(resumed), 1)
        self.assertEqual(resumed[0]["resumed"]["step"], 10)
        self.assertIn("step_00000010", resumed[0]["resumed"]["checkpoint"])
        scalars = self.assert_tensorboard_equals_metrics(crashed, "crash + resume")
        straight = tensorboard_scalars(out)
        print(f"[tracking] crash after step 13, resumed from step 10: TensorBoard shows "
              f"{len(scalars['train/loss'])} train/loss points, steps {scalars['train/loss'][0][0]}.."
              f"{scalars['train/loss'][-1][0]}, none twice; eval/loss {[s for s, _ in scalars['eval/loss']]}")
        self.assertEqual([s for s, _ in scalars["train/loss"]], list(range(1, 25)))
        for (s, a), (_, b) in zip(scalars["train/loss"], straight["train/loss"]):
            self.assertAlmostEqual(a, b, delta=1e-6, msg=f"step {s}: the resumed run is the straight one")
        # The plot script reads the rows of a resumed run (the last row of a step wins).
        png = os.path.join(crashed, "metrics.png")
        plot = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"),
                               os.path.join(crashed, "metrics.jsonl"), "-o", png], capture_output=True, text=True)
        self.assertEqual(plot.returncode, 0, plot.stderr)
        self.assertGreater(os.path.getsize(png), 10000)

    def test_the_loss_of_a_row_is_the_mean_of_its_steps(self):
        every, _ = self.run_cfg(self.cfg, "every_step")
        c = copy.deepcopy(self.cfg)
        c["log"]["every_steps"] = 5
        grouped, _ = self.run_cfg(c, "every_5")
        per_step = {r["step"]: r["loss"] for r in rows_of(every) if "loss" in r}
        rows = [r for r in rows_of(grouped) if "loss" in r]
        previous = 0
        for r in rows:
            want = sum(per_step[s] for s in range(previous + 1, r["step"] + 1)) / (r["step"] - previous)
            self.assertEqual(r["loss_steps"], r["step"] - previous)
            self.assertAlmostEqual(r["loss"], want, delta=1e-6, msg=f"row at step {r['step']}")
            previous = r["step"]
        print(f"[tracking] rows at steps {[r['step'] for r in rows]}: each loss the mean of its steps' losses")

    def test_best_model_and_early_stopping(self):
        c = copy.deepcopy(self.cfg)
        # The validation stream repeats another pattern than the training one: memorising the
        # training pattern soon makes the validation loss rise, and the run stops.
        c["train"].update({"max_steps": 60, "lr": 5e-3, "min_lr": 5e-3, "lr_schedule": "constant"})
        c["eval"] = {"every_steps": 3, "early_stopping_patience": 2, "early_stopping_min_delta": 0.02}
        c["checkpoint"] = {"every_steps": 3, "keep_best": True, "keep_last": 1}
        out, r = self.run_cfg(c, "early")
        rows = rows_of(out)
        vals = [(x["step"], x["val_loss"]) for x in rows if "val_loss" in x]
        # Where it must stop: the first evaluation after `patience` in a row without beating the
        # best so far by more than min_delta.
        best, count, stop = None, 0, None
        for step, loss in vals:
            count = 0 if best is None or loss < best - 0.02 else count + 1
            best = loss if best is None else min(best, loss)
            if count >= 2:
                stop = step
                break
        self.assertIsNotNone(stop, f"no early stop expected from {vals}")
        self.assertEqual(vals[-1][0], stop)
        stop_rows = [x for x in rows if "early_stop" in x]
        self.assertEqual([x["step"] for x in stop_rows], [stop])
        self.assertIn("early stopping", r.stderr)
        self.assertTrue(os.path.exists(os.path.join(out, "final", "model.safetensors")))
        # best/: the lowest logged validation loss, loadable by transformers.
        with open(os.path.join(out, "best", "best.json")) as f:
            best_json = json.load(f)
        lowest = min(vals, key=lambda v: v[1])
        self.assertEqual((best_json["step"], round(best_json["val_loss"], 6)), (lowest[0], round(lowest[1], 6)))
        self.assertFalse(glob.glob(os.path.join(out, ".best.*")), "no temporary folder left")
        model = GPT2LMHeadModel.from_pretrained(os.path.join(out, "best"))
        # The run is deterministic (MKL's reproducible branch): eval on the same branch.
        ev = subprocess.run([BIN, "eval", "--model", os.path.join(out, "best"), "--data", c["data"]["val"],
                             "--seq-len", "16", "--json"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **reproducible_env()))
        self.assertEqual(ev.returncode, 0, ev.stderr)
        best_eval = json.loads(ev.stdout.strip().splitlines()[-1])["loss"]
        print(f"[tracking] validations {[(s, round(v, 4)) for s, v in vals]}; early stop at step {stop}; best/ = step "
              f"{best_json['step']} ({best_json['val_loss']:.4f}; eval of best/ {best_eval:.4f}); "
              f"{sum(p.numel() for p in model.parameters())} parameters loaded by transformers")
        self.assertAlmostEqual(best_eval, lowest[1], delta=1e-5)
        self.assertIn("best val loss", r.stderr)
        # The same run crashed before its stop and resumed stops at the same step, with the same best/.
        crash_at = stop - 2
        crashed, _ = self.run_cfg(c, "early_crash", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": str(crash_at)}, expect=137)
        self.run_cfg(c, "early_crash")
        again = [x for x in rows_of(crashed) if "early_stop" in x]
        self.assertEqual([x["step"] for x in again], [stop])
        with open(os.path.join(crashed, "best", "best.json")) as f:
            self.assertEqual(json.load(f)["step"], best_json["step"])
        # Run again when it has already stopped: nothing more is trained.
        _, r = self.run_cfg(c, "early_crash")
        self.assertIn("had stopped early", r.stderr)
        # A best/ folder the trainer did not write is never replaced.
        mine = self.path("users", "best", "weights.bin")
        with open(mine, "wb") as f:
            f.write(b"the user's")
        users = copy.deepcopy(c)
        users["output_dir"] = os.path.dirname(os.path.dirname(mine))
        cfg_path = os.path.join(self.tmp, "users.json")
        with open(cfg_path, "w") as f:
            json.dump(users, f)
        r = subprocess.run([BIN, "--config", cfg_path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1, r.stderr[-2000:])
        self.assertIn("not a best model this trainer wrote", r.stderr)
        with open(mine, "rb") as f:
            self.assertEqual(f.read(), b"the user's")

    def test_evaluation_at_epoch_ends(self):
        c = copy.deepcopy(self.cfg)
        c["eval"] = {"every_steps": 0, "every_epochs": 0.5}
        out, r = self.run_cfg(c, "epochs")
        samples = (1200 - 1) // 16  # windows an epoch
        steps = [x["step"] for x in rows_of(out) if "val_loss" in x]
        want = sorted({s for s in range(1, 25) if (s * 8) // (samples / 2) > ((s - 1) * 8) // (samples / 2)} | {24})
        print(f"[tracking] {samples} samples an epoch, 8 a step: validation at steps {steps} (half epochs and the end)")
        self.assertEqual(steps, want)


if __name__ == "__main__":
    import unittest
    unittest.main()
