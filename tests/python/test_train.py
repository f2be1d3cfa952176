"""The trainer against PyTorch: parity with transformers + torch.optim.AdamW step for step,
equivalence of micro-batch splits of the same global batch (also with activation
checkpointing), fused AdamW on the CPU, and loss falling on a learnable stream. Run by ctest
(`train.*`), which sets GPT2FT_BIN."""
import copy
import json
import os
import shutil
import tempfile
import unittest

import numpy as np

import train_reference as ref

BIN = os.environ.get("GPT2FT_BIN", "")


def base_config(model_dir, shard_glob):
    return {
        "model": {"init_from": model_dir, "dropout": 0.0},
        "data": {"train": shard_glob, "seq_len": 16, "shuffle": False, "num_workers": 2},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "lr_schedule": "cosine", "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "grad_clip": 0.5, "fused_adamw": "off"},
        "log": {"every_steps": 1, "progress": "lines"},
        "device": "cpu",
    }


class TrainTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not BIN:
            raise RuntimeError("GPT2FT_BIN must be set (run through ctest)")
        cls.tmp = tempfile.mkdtemp(prefix="gpt2ft-train-")
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"))
        cls.tokens = ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"))
        cls.glob = os.path.join(cls.tmp, "train_*.bin")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_matches_pytorch_adamw_step_for_step(self):
        cfg = base_config(self.model_dir, self.glob)
        reference, ref_losses = ref.reference_train(self.model_dir, self.tokens, cfg)
        for variant, patch in (("unfused", {}), ("fused", {"fused_adamw": "on"})):
            with self.subTest(variant=variant):
                c = copy.deepcopy(cfg)
                c["train"].update(patch)
                weights, rows, _ = ref.run_trainer(BIN, c, self.tmp, f"parity_{variant}")
                losses = [r["loss"] for r in rows if "loss" in r]
                diff = ref.max_weight_diff(weights, reference)
                loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
                print(f"[train parity] {variant} AdamW, 6 steps of 2x2: weights max|diff| {diff:.3g}, "
                      f"loss max|diff| {loss_diff:.3g}")
                self.assertEqual(len(losses), len(ref_losses))
                self.assertLess(loss_diff, 1e-5)
                self.assertLess(diff, 1e-5)

    def test_any_split_of_the_global_batch_gives_the_same_weights(self):
        # AdamW and clipping undo a constant gradient scale, so the logged loss and the
        # gradient norm before clipping are compared too: a wrong normalisation changes them.
        results = {}
        for micro in (8, 2, 1):
            for ckpt in ("none", "all"):
                c = base_config(self.model_dir, self.glob)
                c["train"].update({"micro_batch_size": micro, "global_batch_size": 8, "max_steps": 4, "lr": 1e-3,
                                   "min_lr": 1e-4})
                c["model"]["activation_checkpointing"] = ckpt
                weights, rows, _ = ref.run_trainer(BIN, c, self.tmp, f"split_{micro}_{ckpt}")
                results[(micro, ckpt)] = (weights, [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r])
        base_weights, base_rows = results[(8, "none")]
        for key, (weights, rows) in results.items():
            diff = ref.max_weight_diff(weights, base_weights)
            metric_diff = max(max(abs(a[0] - b[0]), abs(a[1] - b[1]) / b[1]) for a, b in zip(rows, base_rows))
            print(f"[accumulation] micro {key[0]} x {8 // key[0]}, checkpointing {key[1]}: weights max|diff| "
                  f"vs 8x1 {diff:.3g}; loss / grad-norm max diff {metric_diff:.3g}")
            self.assertEqual(len(rows), len(base_rows))
            self.assertLess(diff, 1e-6, key)
            self.assertLess(metric_diff, 1e-5, key)

    def test_loss_falls_on_a_learnable_stream(self):
        c = base_config(self.model_dir, self.glob)
        c["data"]["shuffle"] = True
        c["model"]["dropout"] = 0.1
        c["train"].update({"max_steps": 60, "lr": 1e-2, "warmup_steps": 5, "micro_batch_size": 8,
                           "global_batch_size": 8, "grad_clip": 1.0})
        c["log"]["every_steps"] = 10
        _, rows, _ = ref.run_trainer(BIN, c, self.tmp, "learn")
        losses = [r["loss"] for r in rows if "loss" in r]
        print(f"[learning] loss {losses[0]:.3f} -> {losses[-1]:.3f} over 60 steps")
        self.assertLess(losses[-1], 0.35 * losses[0])


if __name__ == "__main__":
    unittest.main()
