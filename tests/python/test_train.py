"""The trainer against PyTorch: parity with transformers + torch.optim.AdamW step for step,
equivalence of micro-batch splits of the same global batch (also with activation
checkpointing), fused AdamW on the CPU, and loss falling on a learnable stream. Run by ctest
(`train.*`), which sets GPT2FT_BIN."""
import copy
import json
import os
import re
import subprocess

import torch
import unittest

import numpy as np

import train_reference as ref
from common import WorkDirTest

BIN = os.environ.get("GPT2FT_BIN", "")


def base_config(model_dir, shard_glob):
    return {
        "model": {"init_from": model_dir, "dropout": 0.0},
        "data": {"train": shard_glob, "seq_len": 16, "shuffle": False, "num_workers": 2},
        "train": {"deterministic": True, "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "lr_schedule": "cosine", "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "grad_clip": 0.5, "fused_adamw": "off"},
        "log": {"every_steps": 1, "progress": "lines"},
        "device": "cpu",
    }


class TrainTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"))
        cls.tokens = ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"))
        cls.glob = os.path.join(cls.tmp, "train_*.bin")

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
        # The validation set (37 windows, evaluated in batches of the micro batch, the default)
        # must be the same windows whatever the split: its losses agree as the weights do.
        val = os.path.join(self.tmp, "split_val", "val_000000.bin")
        os.makedirs(os.path.dirname(val), exist_ok=True)
        ref.make_stream(val, n=37 * 16 + 1, seed=1)
        results = {}
        for micro in (8, 2, 1):
            for ckpt in ("none", "all"):
                c = base_config(self.model_dir, self.glob)
                c["train"].update({"micro_batch_size": micro, "global_batch_size": 8, "max_steps": 4, "lr": 1e-3,
                                   "min_lr": 1e-4})
                c["data"]["val"] = val
                c["eval"] = {"every_steps": 2}
                c["model"]["activation_checkpointing"] = ckpt
                weights, rows, _ = ref.run_trainer(BIN, c, self.tmp, f"split_{micro}_{ckpt}")
                results[(micro, ckpt)] = (weights, [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r],
                                          [(r["step"], r["val_loss"], r["val_tokens"]) for r in rows if "val_loss" in r])
        base_weights, base_rows, base_val = results[(8, "none")]
        self.assertEqual([v[2] for v in base_val], [37 * 16] * 2, "every window, at steps 2 and 4")
        for key, (weights, rows, vals) in results.items():
            diff = ref.max_weight_diff(weights, base_weights)
            metric_diff = max(max(abs(a[0] - b[0]), abs(a[1] - b[1]) / b[1]) for a, b in zip(rows, base_rows))
            val_diff = max(abs(a[1] - b[1]) / b[1] for a, b in zip(vals, base_val))
            print(f"[accumulation] micro {key[0]} x {8 // key[0]}, checkpointing {key[1]}: weights max|diff| "
                  f"vs 8x1 {diff:.3g}; loss / grad-norm max diff {metric_diff:.3g}; val loss max rel diff {val_diff:.3g}")
            self.assertEqual(len(rows), len(base_rows))
            self.assertLess(diff, 1e-6, key)
            self.assertLess(metric_diff, 1e-5, key)
            self.assertEqual([(v[0], v[2]) for v in vals], [(v[0], v[2]) for v in base_val], key)
            self.assertLess(val_diff, 1e-5, key)

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

    def test_bfloat16_autocast_on_cpu_learns_and_stays_close_to_float32(self):
        c = base_config(self.model_dir, self.glob)
        c["train"].update({"max_steps": 30, "lr": 1e-2, "warmup_steps": 3, "micro_batch_size": 4, "global_batch_size": 8})
        c["log"]["every_steps"] = 5
        _, fp32_rows, _ = ref.run_trainer(BIN, c, self.tmp, "fp32")
        c["amp"] = {"dtype": "bfloat16"}
        _, bf16_rows, _ = ref.run_trainer(BIN, c, self.tmp, "bf16")
        fp32 = [r["loss"] for r in fp32_rows if "loss" in r]
        bf16 = [r["loss"] for r in bf16_rows if "loss" in r]
        print(f"[amp] CPU bf16 loss {bf16[0]:.3f} -> {bf16[-1]:.3f}; fp32 {fp32[0]:.3f} -> {fp32[-1]:.3f}")
        self.assertLess(bf16[-1], 0.5 * bf16[0])
        self.assertLess(abs(bf16[0] - fp32[0]), 0.05)  # the same first batch, computed in bf16
        self.assertNotEqual(bf16, fp32)  # autocast really ran

    def test_freezing_and_checkpointing_combine(self):
        # A frozen part before a checkpointed block once made that block train nothing. Every
        # freezing x checkpointing combination (2 x 2 accumulation, also under bf16 autocast)
        # must end with the weights of the same freezing without checkpointing, and every
        # trained tensor must have moved.
        from safetensors.torch import load_file
        model_dir = ref.make_model(os.path.join(self.tmp, "init3"), n_layer=3)
        init = load_file(os.path.join(model_dir, "model.safetensors"))
        freezes = {"embeddings": {"freeze_embeddings": True}, "block0": {"freeze_blocks": 1},
                   "embeddings+2blocks": {"freeze_embeddings": True, "freeze_blocks": 2}}
        for name, freeze in freezes.items():
            for amp in ("none", "bfloat16"):
                if amp == "bfloat16" and name != "embeddings+2blocks":
                    continue
                results = {}
                for ckpt in ("none", "all", 2):
                    c = base_config(model_dir, self.glob)
                    c["model"].update(freeze, activation_checkpointing=ckpt)
                    c["train"].update({"max_steps": 4, "lr": 1e-3, "min_lr": 1e-4})
                    c["amp"] = {"dtype": amp}
                    weights, _, _ = ref.run_trainer(BIN, c, self.tmp, f"freeze_{name}_{amp}_{ckpt}")
                    results[ckpt] = weights
                frozen = [k for k in init if (("wte" in k or "wpe" in k) and freeze.get("freeze_embeddings"))
                          or any(f".h.{i}." in k for i in range(freeze.get("freeze_blocks", 0)))]
                trained = [k for k in init if k not in frozen and not k.endswith(".attn.bias")
                           and not k.endswith(".masked_bias")]
                for ckpt, weights in results.items():
                    diff = ref.max_weight_diff(weights, results["none"])
                    unmoved = [k for k in trained if torch.equal(weights[k], init[k])]
                    print(f"[freeze x checkpointing] freeze {name}, amp {amp}, checkpointing {ckpt}: weights "
                          f"max|diff| vs no checkpointing {diff:.3g}; trained tensors unchanged: {len(unmoved)}")
                    self.assertLess(diff, 1e-6, (name, amp, ckpt))
                    self.assertEqual(unmoved, [], (name, amp, ckpt))
                    for k in frozen:
                        self.assertTrue(torch.equal(weights[k], init[k]), f"{k} changed although frozen")

    def test_optimizer_offload_equals_adamw_in_place_and_checkpoints_cross_over(self):
        # AdamW's state on the host, fed in 1 KiB buckets (so every step crosses many of them)
        # as backward finishes them, with accumulation and clipping, alone, with checkpointing
        # + bf16, with float16's loss scale, after an out-of-memory back-off, and with ZeRO-1
        # over two ranks: the weights and AdamW state must be those of AdamW in place; a
        # checkpoint written with offload resumes without it and the other way round.
        from safetensors.torch import load_file
        from test_distributed import finish, free_port, start_ranks, write_config

        def state(out):
            d = os.path.join(out, "checkpoints", "step_00000006")
            return load_file(os.path.join(d, "trainer_state.safetensors"))

        def compare(a, b, label, tol=1e-6):
            wdiff = ref.max_weight_diff(a[0], b[0])
            adam = {k: v for k, v in a[1].items() if k.startswith("adamw.")}
            sdiff = max((v - b[1][k]).abs().max().item() for k, v in adam.items())
            print(f"[offload] {label}: weights max|diff| {wdiff:.3g}, AdamW state max|diff| {sdiff:.3g} "
                  f"({len(adam)} state tensors)")
            self.assertEqual(adam.keys(), {k for k in b[1] if k.startswith("adamw.")})
            self.assertLess(wdiff, tol, label)
            self.assertLess(sdiff, tol, label)

        runs = {}
        for name, patch in (("in_place", {}), ("offload", {"offload": True}),
                            ("ckpt_bf16", {"ckpt": True}), ("ckpt_bf16_offload", {"ckpt": True, "offload": True}),
                            ("fp16", {"fp16": True}), ("fp16_offload", {"fp16": True, "offload": True}),
                            ("oom", {"oom": True}), ("oom_offload", {"oom": True, "offload": True}),
                            ("freeze_ckpt", {"freeze": True}), ("freeze_ckpt_offload", {"freeze": True, "offload": True})):
            c = base_config(self.model_dir, self.glob)
            c["train"].update({"fused_adamw": "on", "lr": 1e-3, "min_lr": 1e-4})
            c["distributed"] = {"bucket_mb": 0.001}
            if patch.get("offload"):
                c["train"]["optimizer_offload"] = "cpu"
            if patch.get("ckpt"):
                c["model"]["activation_checkpointing"] = "all"
                c["amp"] = {"dtype": "bfloat16"}
            if patch.get("freeze"):  # the frozen parts have no AdamW state; the rest is checkpointed
                c["model"].update({"freeze_embeddings": True, "freeze_blocks": 1, "activation_checkpointing": "all"})
            if patch.get("fp16"):
                c["amp"] = {"dtype": "float16", "init_scale": 3000.0}  # 1/3000 rounds in float32
            env = {"GPT2FT_FAULT_OOM_ABOVE_MICRO": "1"} if patch.get("oom") else {}
            weights, _, r = ref.run_trainer(BIN, c, self.tmp, f"offload_{name}", env=env)
            runs[name] = (weights, state(os.path.join(self.tmp, f"offload_{name}")))
            if patch.get("offload"):  # every step, every bucket went during backward
                self.assertIn("AdamW on the host", r.stderr)
                m = re.search(r"(\d+) gradient bucket\(s\) a step; sent to the host (\d+) time\(s\) during backward, "
                              r"(\d+) at the step", r.stderr)
                self.assertIsNotNone(m, r.stderr[-2000:])
                buckets, early, late = (int(g) for g in m.groups())
                print(f"[offload] {name}: {buckets} buckets a step; {early} sent during backward, {late} at the step")
                self.assertGreater(buckets, 2)
                self.assertEqual((early, late), (6 * buckets, 0), name)
            if patch.get("oom"):
                self.assertIn("backing off to micro batch 1 x accumulation 4", r.stderr)
        compare(runs["offload"], runs["in_place"], "offload vs in place, 6 steps of 2x2, clip 0.5")
        compare(runs["ckpt_bf16_offload"], runs["ckpt_bf16"], "offload vs in place, checkpointing all + bf16")
        compare(runs["fp16_offload"], runs["fp16"], "offload vs in place, float16 with the loss scale")
        compare(runs["oom_offload"], runs["oom"], "offload vs in place, after backing off to micro batch 1")
        compare(runs["freeze_ckpt_offload"], runs["freeze_ckpt"],
                "offload vs in place, embeddings and block 0 frozen, checkpointing all")

        for first, then in (("cpu", "none"), ("none", "cpu")):
            c = base_config(self.model_dir, self.glob)
            c["train"].update({"fused_adamw": "on", "lr": 1e-3, "min_lr": 1e-4, "optimizer_offload": first})
            c["checkpoint"] = {"every_steps": 3}
            path, out = write_config(c, self.tmp, f"cross_{first}")
            r = subprocess.run([BIN, "--config", path], capture_output=True, text=True,
                               env=dict(os.environ, GPT2FT_FAULT_CRASH_AFTER_STEP="4"))
            self.assertEqual(r.returncode, 137, r.stderr[-2000:])
            r = subprocess.run([BIN, "--config", path, "--set", f"train.optimizer_offload={then}"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr[-2000:])
            compare((load_file(os.path.join(out, "final", "model.safetensors")), state(out)), runs["in_place"],
                    f"checkpoint at step 3 written with offload {first}, resumed with {then}")

        c = base_config(self.model_dir, self.glob)
        c["train"].update({"fused_adamw": "on", "lr": 1e-3, "min_lr": 1e-4, "optimizer_offload": "cpu"})
        c["distributed"] = {"shard_optimizer": True, "bucket_mb": 0.001, "timeout_s": 60}
        path, out = write_config(c, self.tmp, "offload_zero1")
        results = finish(start_ranks(path, 2, free_port()))
        self.assertEqual([rc for rc, _ in results], [0, 0], results[0][1][-2000:])
        # averaged gradients are final only after backward: they go at the step
        self.assertRegex(results[0][1], r"sent to the host 0 time\(s\) during backward, [1-9]\d* at the step")
        compare((load_file(os.path.join(out, "final", "model.safetensors")), state(out)), runs["in_place"],
                "ZeRO-1 over 2 ranks, each offloading its share, vs one process in place", tol=1e-5)

    def test_freezing_keeps_parts_fixed_and_resizing_adds_mean_rows(self):
        from safetensors.torch import load_file
        init = load_file(os.path.join(self.model_dir, "model.safetensors"))
        c = base_config(self.model_dir, self.glob)
        c["model"].update({"freeze_embeddings": True, "freeze_blocks": 1})
        weights, _, _ = ref.run_trainer(BIN, c, self.tmp, "frozen")
        frozen = [k for k in weights if ".h.0." in k or "wte" in k or "wpe" in k]
        trained = [k for k in weights if ".h.1." in k]
        for k in frozen:
            self.assertTrue(torch.equal(weights[k], init[k]), f"{k} changed although frozen")
        self.assertTrue(any(not torch.equal(weights[k], init[k]) for k in trained))
        c = base_config(self.model_dir, self.glob)
        c["model"]["resize_vocab"] = 120
        c["train"].update({"max_steps": 1, "lr": 0.0, "min_lr": 0.0, "warmup_steps": 0})
        weights, _, _ = ref.run_trainer(BIN, c, self.tmp, "resized")
        wte, old = weights["transformer.wte.weight"], init["transformer.wte.weight"]
        self.assertEqual(tuple(wte.shape), (120, old.shape[1]))
        self.assertTrue(torch.equal(wte[:97], old))
        self.assertTrue(torch.allclose(wte[97:], old.mean(0).expand(23, -1), atol=1e-7))
        with open(os.path.join(self.tmp, "resized", "final", "config.json")) as f:
            self.assertEqual(json.load(f)["vocab_size"], 120)


if __name__ == "__main__":
    unittest.main()
