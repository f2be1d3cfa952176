"""train.optimizer "adamw_8bit" end to end against torchao 0.18's AdamW8bit: 8 full-batch steps
of a model whose large tensors are quantized, the checkpointed state's size against AdamW's, a
bitwise resume, and the options users set with it (accumulation, checkpointing, out-of-memory
back-off, ZeRO-1 over two ranks, bf16, freezing, LoRA), each against the same 8-bit run without
it. Run by ctest (`adamw_8bit.*`), which sets GPT2FT_BIN."""
import copy
import glob
import json
import os
import subprocess

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import train_reference as ref
from common import WorkDirTest
from test_distributed import finish, free_port, start_ranks, write_config

BIN = os.environ.get("GPT2FT_BIN", "")
T, WINDOWS = 16, 32


def base_config(model_dir, shard):
    return {
        "model": {"init_from": model_dir, "dropout": 0.0},
        "data": {"train": shard, "seq_len": T, "shuffle": False, "num_workers": 2},
        "train": {"deterministic": True, "optimizer": "adamw_8bit", "micro_batch_size": 8, "global_batch_size": WINDOWS, "max_steps": 8,
                  "lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.1,
                  "betas": [0.9, 0.95], "grad_clip": 1.0},
        "log": {"every_steps": 1, "progress": "lines"},
        "device": "cpu",
    }


def flat(weights, keys):
    return torch.cat([weights[k].double().reshape(-1) for k in keys])


def as_linear(model):
    """transformers' Conv1D layers (weight (in, out)) as nn.Linear (weight (out, in)), the layout
    our trainer keeps: torchao's blocks of 256 consecutive values then hold the same values as
    ours. (On Conv1D's layout a block of c_attn mixes query, key and value columns.) Returns
    the names of the swapped weights."""
    from transformers.pytorch_utils import Conv1D
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
                swapped.append(f"{name}.{child_name}.weight" if name else f"{child_name}.weight")
    return swapped


def reference_run(model_dir, tokens, optimizer, steps=8, linear_layout=True, embeddings="8bit"):
    """Full-batch steps (every window in each step) with clipping, as the config says; weights
    returned in transformers' layout. embeddings "float32": wte and wpe under torchao's float32
    AdamW (_AdamW), everything else under its AdamW8bit (train.adamw_8bit.embeddings)."""
    torch.compile = lambda fn=None, **kw: fn  # torchao's step, eagerly: the same ATen ops
    model = GPT2LMHeadModel.from_pretrained(model_dir).float()
    model.eval()  # no dropout (the config's model.dropout 0)
    swapped = as_linear(model) if linear_layout else []
    embedding = [model.transformer.wte.weight, model.transformer.wpe.weight] if embeddings == "float32" else []
    rest = [p for p in model.parameters() if all(p is not e for e in embedding)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "adamw_8bit":
        from torchao.optim import AdamW8bit, _AdamW
        eight = AdamW8bit(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        full = _AdamW(embedding, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) if embedding else None

        class Both:
            def step(self):
                eight.step()
                if full:
                    full.step()

            def zero_grad(self, set_to_none=True):
                model.zero_grad(set_to_none=set_to_none)
        opt = Both()
    else:
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    batch = torch.tensor(tokens[:WINDOWS * T + 1].astype("int64"))
    x, y = batch[:-1].view(WINDOWS, T), batch[1:].view(WINDOWS, T)
    for _ in range(steps):
        logits = model(input_ids=x).logits
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().t() if k in swapped else v.detach() for k, v in model.state_dict().items()}


def optimizer_bytes(out):
    state = load_file(sorted(glob.glob(os.path.join(out, "checkpoints", "step_*", "trainer_state.safetensors")))[-1])
    return sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("adamw"))


class AdamW8bitTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # 64 channels and a vocabulary of 128: every matrix is a multiple of 256 values, and all
        # but wpe (2048) are at least 4096, so they are quantized.
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"), n_embd=64, vocab_size=128, n_positions=T)
        cls.shard = os.path.join(cls.tmp, "train_000000.bin")
        cls.tokens = ref.make_stream(cls.shard, n=WINDOWS * T + 1, vocab=128)

    def run_ours(self, name, cfg, env=None, expect=0):
        path, out = write_config(cfg, self.tmp, name)
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, **(env or {})))
        self.assertEqual(r.returncode, expect, r.stderr[-3000:])
        return out, r

    def weights(self, out):
        return load_file(os.path.join(out, "final", "model.safetensors"))

    def test_eight_full_batch_steps_follow_torchao(self):
        fp32 = reference_run(self.model_dir, self.tokens, "adamw")
        # torchao's rule ("8bit": every large tensor), and the default: embeddings in float32.
        for embeddings in ("8bit", "float32"):
            c = base_config(self.model_dir, self.shard)
            c["train"]["adamw_8bit"] = {"embeddings": embeddings}
            out, r = self.run_ours("ours_" + embeddings, c)
            self.assertIn("8-bit", r.stderr)
            ours = self.weights(out)
            keys = sorted(ours)
            ao8 = reference_run(self.model_dir, self.tokens, "adamw_8bit", embeddings=embeddings)
            gap = (flat(ao8, keys) - flat(fp32, keys)).norm().item()
            dist = (flat(ours, keys) - flat(ao8, keys)).norm().item()
            ours_fp32 = (flat(ours, keys) - flat(fp32, keys)).norm().item()
            print(f"[adamw_8bit] embeddings {embeddings}, 8 full-batch steps: |ours - torchao| {dist:.3g}, |torchao - "
                  f"fp32 AdamW| {gap:.3g} (ratio {dist / gap:.3g}); |ours - fp32| {ours_fp32:.3g}")
            self.assertGreater(gap, 0)
            self.assertLess(dist, 0.1 * gap)
            state = load_file(sorted(glob.glob(os.path.join(out, "checkpoints", "step_*",
                                                            "trainer_state.safetensors")))[-1])
            wte = state["adamw8bit.exp_avg.transformer.wte.weight"].dtype
            self.assertEqual(wte, torch.uint8 if embeddings == "8bit" else torch.float32)
            self.assertEqual(state["adamw8bit.exp_avg.transformer.h.0.mlp.c_fc.weight"].dtype, torch.uint8)
        keys = sorted(ours)
        # On transformers' Conv1D layout torchao's blocks would differ from ours (and mix
        # query, key and value columns): that trajectory is farther from fp32 AdamW's.
        conv1d = reference_run(self.model_dir, self.tokens, "adamw_8bit", linear_layout=False)
        far = (flat(conv1d, keys) - flat(fp32, keys)).norm().item()
        print(f"[adamw_8bit] torchao 8-bit on Conv1D's layout: |it - fp32 AdamW| {far:.3g}")

    def test_state_is_under_a_third_of_adamw_and_resume_is_bitwise(self):
        c = base_config(self.model_dir, self.shard)
        c["train"]["deterministic"] = True  # two processes compared bitwise
        c["checkpoint"] = {"every_steps": 3}
        eight, _ = self.run_ours("state_8bit", c)
        plain = copy.deepcopy(c)
        plain["train"]["optimizer"] = "adamw"
        full, _ = self.run_ours("state_adamw", plain)
        a, b = optimizer_bytes(eight), optimizer_bytes(full)
        print(f"[adamw_8bit] checkpointed optimizer state: {a} bytes vs AdamW's {b} ({a / b:.3f}x)")
        self.assertLessEqual(a, 0.35 * b)
        # A crash after step 5, then the same command: bitwise the straight run.
        crashed, _ = self.run_ours("crash", c, env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "5"}, expect=137)
        self.run_ours("crash", c)
        diff = ref.max_weight_diff(self.weights(crashed), self.weights(eight))
        print(f"[adamw_8bit] crash after step 5 and resume: max|diff| {diff:.3g}")
        self.assertEqual(diff, 0.0)
        # The other optimizer's checkpoint (an out-of-memory advice followed back) is converted:
        # 8-bit AdamW's moments dequantized into AdamW's, and the change recorded.
        other = copy.deepcopy(plain)
        other["train"]["max_steps"] = 10
        path, out = write_config(other, self.tmp, "state_8bit")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn('train.optimizer "adamw_8bit" -> "adamw": the moments dequantized', r.stderr)
        self.assertIn("AdamW resumed from 8-bit AdamW's state", r.stderr)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            resumed = [json.loads(line)["resumed"] for line in f if '"resumed"' in line]
        self.assertTrue(any("train.optimizer" in c for c in resumed[-1]["changed"]), resumed)

    def test_options_combine_with_the_8bit_state(self):
        c = base_config(self.model_dir, self.shard)
        base, _ = self.run_ours("combo_base", c)
        base_w = self.weights(base)
        keys = sorted(base_w)
        fp32 = copy.deepcopy(c)
        fp32["train"]["optimizer"] = "adamw"
        gap = (flat(self.weights(self.run_ours("combo_fp32", fp32)[0]), keys) - flat(base_w, keys)).norm().item()

        def check(label, out, bound):
            dist = (flat(self.weights(out), keys) - flat(base_w, keys)).norm().item()
            print(f"[adamw_8bit] {label}: |diff| vs the 8-bit run {dist:.3g} ({dist / gap:.3g} of its distance to "
                  f"fp32 AdamW)")
            self.assertLessEqual(dist, bound * gap, label)

        variants = {
            "micro 2 x accumulation 16": ({"train": {"micro_batch_size": 2}}, {}, 0.05),
            "checkpointing all": ({"model": {"activation_checkpointing": "all"}}, {}, 1e-6),
            "out-of-memory back-off 8 -> 4": ({}, {"GPT2FT_FAULT_OOM_ABOVE_MICRO": "4"}, 0.05),
        }
        for label, (patch, env, bound) in variants.items():
            cc = copy.deepcopy(c)
            for section, values in patch.items():
                cc[section].update(values)
            check(label, self.run_ours("combo_" + label.split()[0], cc, env=env)[0], bound)
        # ZeRO-1 over two ranks: each quantizes the tensors it owns.
        z = copy.deepcopy(c)
        z["train"]["micro_batch_size"] = 4
        z["distributed"] = {"backend": "gloo", "shard_optimizer": True}
        path, out = write_config(z, self.tmp, "combo_zero1")
        for rank, (rc, err) in enumerate(finish(start_ranks(path, 2, free_port()))):
            self.assertEqual(rc, 0, f"rank {rank}: {err[-3000:]}")
        check("ZeRO-1, 2 ranks x 4 x 4", out, 0.05)
        # bf16 autocast learns with it; freezing leaves the frozen block as it was.
        bf16 = copy.deepcopy(c)
        bf16["amp"] = {"dtype": "bfloat16"}
        bf16["train"]["max_steps"] = 30
        out, _ = self.run_ours("combo_bf16", bf16)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        print(f"[adamw_8bit] bf16: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps")
        self.assertLess(losses[-1], 0.8 * losses[0])
        # float16's loss scale starting far too high: the overflowing steps are skipped (the
        # 8-bit state untouched: train.adamw_8bit checks that exactly), then it learns.
        fp16 = copy.deepcopy(c)
        fp16["amp"] = {"dtype": "float16", "init_scale": 1e20, "backoff_factor": 1e-8}
        fp16["train"]["max_steps"] = 30
        out, _ = self.run_ours("combo_fp16", fp16)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"loss"' in line]
        print(f"[adamw_8bit] float16: {rows[-1]['skipped_steps']} step(s) skipped by the loss scale; loss "
              f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
        self.assertGreaterEqual(rows[-1]["skipped_steps"], 1)
        self.assertLess(rows[-1]["loss"], 0.8 * rows[0]["loss"])
        frozen = copy.deepcopy(c)
        frozen["model"]["freeze_blocks"] = 1
        w = self.weights(self.run_ours("combo_freeze", frozen)[0])
        init = load_file(os.path.join(self.model_dir, "model.safetensors"))
        for k in w:
            moved = not torch.equal(w[k], init[k])
            self.assertEqual(moved, ".h.0." not in k, k)
        # LoRA: adapters of rank 4 are under 4096 values, so their moments stay float32: the
        # same update as AdamW's, up to the order of operations.
        lora = copy.deepcopy(c)
        lora["model"]["lora"] = {"rank": 4, "alpha": 8, "targets": ["c_attn", "c_fc"]}
        lora["train"]["lr"] = 1e-2
        a = load_file(os.path.join(self.run_ours("lora_8bit", lora)[0], "final", "adapter_model.safetensors"))
        lora["train"]["optimizer"] = "adamw"
        b = load_file(os.path.join(self.run_ours("lora_adamw", lora)[0], "final", "adapter_model.safetensors"))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"[adamw_8bit] LoRA r=4 (float32 moments): adapters max|diff| vs AdamW {diff:.3g}")
        self.assertLess(diff, 1e-5)
        # Offloaded: the 8-bit state on the host, the same update.
        off = copy.deepcopy(c)
        off["train"]["optimizer_offload"] = "cpu"
        out, r = self.run_ours("combo_offload", off)
        self.assertIn("8-bit (torchao's AdamW8bit) on the host", r.stderr)
        check("optimizer offload (8-bit state on the host)", out, 1e-6)


if __name__ == "__main__":
    import unittest
    unittest.main()
