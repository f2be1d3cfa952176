"""LoRA training against PEFT: a multi-step trajectory (AdamW, clipping, accumulation, warmup and
cosine) equals PEFT + torch.optim.AdamW; the adapter we write loads in PEFT and gives the
logits of our merged model loaded by transformers; and LoRA combined with what users set with
it: checkpointing, bf16, a 16-bit base, resume after a crash (bitwise), out-of-memory back-off,
two ranks, eval and generate with --adapter. Run by ctest (`lora.*`), which sets GPT2FT_BIN."""
import copy
import json
import os
import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import train_reference as ref
from common import WorkDirTest
from make_lora_golden import make as make_peft_case
from test_distributed import finish, free_port, start_ranks, write_config

BIN = os.environ.get("GPT2FT_BIN", "")
PREFIX = "base_model.model."


def lora_config(base, adapter, glob):
    return {
        "model": {"init_from": base, "dropout": 0.0, "lora": {"init_from": adapter}},
        "data": {"train": glob, "seq_len": 16, "shuffle": False, "num_workers": 2},
        "train": {"deterministic": True, "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "lr_schedule": "cosine", "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "grad_clip": 0.5, "fused_adamw": "off"},
        "log": {"every_steps": 1, "progress": "lines"},
        "device": "cpu",
    }


def adapter_tensors(out, folder="final"):
    return load_file(os.path.join(out, folder, "adapter_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run(cfg, workdir, name, env=None, expect=0):
    path, out = write_config(cfg, workdir, name)
    r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, **(env or {})))
    if r.returncode != expect:
        raise AssertionError(f"{name}: exit {r.returncode}, expected {expect}:\n{r.stderr[-3000:]}")
    return out, r


def peft_reference(base, adapter, tokens, cfg):
    """PEFT on transformers, trained like the config says (shard order, as train_reference)."""
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base).float(), adapter, is_trainable=True)
    model.train()
    tr = cfg["train"]
    T, B = cfg["data"]["seq_len"], tr["micro_batch_size"]
    A = tr["global_batch_size"] // B
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trained if p.dim() >= 2], "weight_decay": tr["weight_decay"]},
                             {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}],
                            lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr.get("eps", 1e-8), foreach=False)
    windows = [tokens[k * T: k * T + T + 1] for k in range((len(tokens) - 1) // T)]
    position, losses = 0, []
    for step in range(tr["max_steps"]):
        for g in opt.param_groups:
            g["lr"] = ref.lr_at(step, tr["lr"], tr["min_lr"], tr["warmup_steps"], tr["max_steps"], tr["lr_schedule"])
        total = 0.0
        for _ in range(A):
            batch = torch.tensor(np.stack([windows[(position + i) % len(windows)] for i in range(B)]).astype(np.int64))
            position += B
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)) / A
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trained, tr["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    state = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad}
    return state, losses


class LoraTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        make_peft_case(cls.tmp, "case", dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=32),
                       dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]), 2, 16, seed=7)
        cls.base = os.path.join(cls.tmp, "case", "base")
        cls.adapter = os.path.join(cls.tmp, "case", "adapter")
        cls.tokens = ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"))
        cls.glob = os.path.join(cls.tmp, "train_*.bin")
        cls.cfg = lora_config(cls.base, cls.adapter, cls.glob)

    def test_training_matches_peft_and_adamw_step_for_step(self):
        reference, ref_losses = peft_reference(self.base, self.adapter, self.tokens, self.cfg)
        for variant in ("off", "on"):
            with self.subTest(fused_adamw=variant):
                c = copy.deepcopy(self.cfg)
                c["train"]["fused_adamw"] = variant
                out, _ = run(c, self.tmp, f"peft_{variant}")
                ours = adapter_tensors(out)
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f if '"loss"' in line]
                diff = max_diff(ours, reference)
                loss_diff = max(abs(r["loss"] - l) for r, l in zip(rows, ref_losses))
                moved = max_diff(ours, load_file(os.path.join(self.adapter, "adapter_model.safetensors")))
                print(f"[lora vs peft] {variant} fused AdamW, 6 steps of 2x2, clip 0.5: adapters max|diff| {diff:.3g}, "
                      f"loss max|diff| {loss_diff:.3g} (adapters moved by {moved:.3g})")
                self.assertEqual(len(rows), len(ref_losses))
                self.assertLess(diff, 1e-5)
                self.assertLess(loss_diff, 1e-5)
                self.assertGreater(moved, 1e-3)

    def test_peft_loads_our_adapter_and_it_equals_our_merged_model(self):
        out, _ = run(self.cfg, self.tmp, "merge_src")
        final = os.path.join(out, "final")
        with open(os.path.join(final, "adapter_config.json")) as f:
            self.assertEqual(json.load(f)["base_model_name_or_path"], os.path.abspath(self.base))
        self.assertFalse(os.path.exists(os.path.join(final, "model.safetensors")))
        merged = os.path.join(self.tmp, "merged")
        r = subprocess.run([BIN, "merge-lora", "--base", self.base, "--adapter", final, "--output", merged],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        ids = torch.tensor([self.tokens[:16].astype(np.int64), self.tokens[40:56].astype(np.int64)])
        with torch.no_grad():
            peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(self.base), final).eval()(ids).logits
            hf = GPT2LMHeadModel.from_pretrained(merged).eval()(ids).logits
            base = GPT2LMHeadModel.from_pretrained(self.base).eval()(ids).logits
        diff, effect = (peft - hf).abs().max().item(), (peft - base).abs().max().item()
        print(f"[lora merge] PEFT(base + our adapter) vs transformers(our merged model): logits max|diff| {diff:.3g} "
              f"(the adapter changes the logits by {effect:.3g})")
        self.assertLess(diff, 1e-5)
        self.assertGreater(effect, 1e-3)

    def test_checkpoint_holds_only_the_adapter_and_resume_is_bitwise(self):
        c = copy.deepcopy(self.cfg)
        c["model"]["dropout"] = 0.1
        c["model"]["lora"]["dropout"] = 0.1
        c["checkpoint"] = {"every_steps": 2}
        c["train"]["deterministic"] = True  # two processes compared bitwise
        straight, _ = run(c, self.tmp, "straight")
        crashed, _ = run(c, self.tmp, "crashed", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "5"}, expect=137)
        ckpt = os.path.join(crashed, "checkpoints", "step_00000004")
        self.assertEqual(sorted(os.listdir(ckpt)), ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                                    "trainer_state.json", "trainer_state.safetensors"])
        state = load_file(os.path.join(ckpt, "trainer_state.safetensors"))
        self.assertTrue(all(".lora_" in k for k in state if k.startswith("adamw.")))
        _, r = run(c, self.tmp, "crashed")
        self.assertIn("resumed from", r.stderr)
        a, b = adapter_tensors(crashed), adapter_tensors(straight)
        self.assertEqual(a.keys(), b.keys())
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a), "resumed adapters differ from the straight run")
        print(f"[lora resume] crash after step 5, resume from the step-4 checkpoint ({len(a)} adapter tensors, "
              f"dropout 0.1): bitwise equal to the straight run")

    def test_lora_combines_with_checkpointing_bf16_accumulation_and_out_of_memory(self):
        results = {}
        for name, patch, env in (
                ("plain", {}, {}),
                ("ckpt_all", {"model": {"activation_checkpointing": "all"}}, {}),
                ("ckpt_2_micro1", {"model": {"activation_checkpointing": 2}, "train": {"micro_batch_size": 1}}, {}),
                ("oom_4_to_2", {"train": {"micro_batch_size": 4}}, {"GPT2FT_FAULT_OOM_ABOVE_MICRO": "2"}),
                ("bf16", {"amp": {"dtype": "bfloat16"}}, {}),
                ("bf16_ckpt", {"amp": {"dtype": "bfloat16"}, "model": {"activation_checkpointing": "all"}}, {}),
                ("bf16_base", {"amp": {"dtype": "bfloat16"}, "model": {"lora": {"base_dtype": "bfloat16"}}}, {}),
                ("offload_ckpt", {"train": {"optimizer_offload": "cpu"}, "model": {"activation_checkpointing": "all"},
                                  "distributed": {"bucket_mb": 0.001}}, {})):
            c = copy.deepcopy(self.cfg)
            c["train"].update({"global_batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "max_steps": 4})
            for section, values in patch.items():
                for k, v in values.items():
                    if isinstance(v, dict):
                        c[section][k].update(v)
                    else:
                        c.setdefault(section, {})[k] = v
            out, r = run(c, self.tmp, f"combo_{name}", env=env)
            results[name] = (adapter_tensors(out), r.stderr)
        for name, pair in (("ckpt_all", "plain"), ("ckpt_2_micro1", "plain"), ("oom_4_to_2", "plain"),
                           ("bf16_ckpt", "bf16"), ("offload_ckpt", "plain")):
            diff = max_diff(results[name][0], results[pair][0])
            print(f"[lora combinations] {name} vs {pair}: adapters max|diff| {diff:.3g}")
            self.assertLess(diff, 1e-6, name)
        self.assertIn("OUT OF MEMORY", results["oom_4_to_2"][1])
        # the adapters' AdamW on the host, fed as backward finishes them
        self.assertRegex(results["offload_ckpt"][1], r"sent to the host [1-9]\d* time\(s\) during backward, 0 at the step")
        for name in ("bf16", "bf16_base"):
            diff = max_diff(results[name][0], results["plain"][0])
            print(f"[lora combinations] {name} vs float32: adapters max|diff| {diff:.3g} (16-bit rounding)")
            self.assertLess(diff, 5e-2)
            self.assertGreater(diff, 0)  # bf16 really ran
        c = copy.deepcopy(self.cfg)
        c["model"]["lora"]["base_dtype"] = "bfloat16"
        _, r = run(c, self.tmp, "bf16_base_no_amp", expect=1)
        self.assertIn("model.lora.base_dtype", r.stderr)
        self.assertIn("amp.dtype", r.stderr)

    def test_two_ranks_reduce_only_the_adapters_and_equal_one_process(self):
        c = copy.deepcopy(self.cfg)
        c["train"]["global_batch_size"] = 8
        c["distributed"] = {"timeout_s": 60}
        single, _ = run(c, self.tmp, "one_process")
        path, out = write_config(c, self.tmp, "two_ranks")
        results = finish(start_ranks(path, 2, free_port()))
        self.assertEqual([rc for rc, _ in results], [0, 0], results[0][1][-2000:])
        diff = max_diff(adapter_tensors(out), adapter_tensors(single))
        buckets = [line for line in results[0][1].splitlines() if "bucket(s)" in line]
        print(f"[lora distributed] 2 ranks vs one process: adapters max|diff| {diff:.3g}; {buckets[0].split('] ')[-1]}")
        self.assertLess(diff, 1e-6)
        self.assertIn("0.0 MiB", buckets[0])  # only the adapters' few KiB travel

    def test_eval_and_generate_take_the_adapter(self):
        from common import write_shard
        rng = np.random.default_rng(3)
        tokens = rng.integers(0, 97, size=16 * 6 + 1)
        write_shard(os.path.join(self.tmp, "val_eval.bin"), tokens)
        from common import reproducible_env
        r = subprocess.run([BIN, "eval", "--model", self.base, "--adapter", self.adapter, "--data",
                            os.path.join(self.tmp, "val_eval.bin"), "--seq-len", "16", "--device", "cpu", "--json"],
                           capture_output=True, text=True, env=dict(os.environ, **reproducible_env()))
        self.assertEqual(r.returncode, 0, r.stderr)
        got = json.loads(r.stdout.strip().splitlines()[-1])["loss"]
        # PEFT's loss in float64: a reference with no rounding of its own.
        model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(self.base), self.adapter).eval().double()
        windows = torch.tensor(np.stack([tokens[k * 16: k * 16 + 17] for k in range(6)]).astype(np.int64))
        with torch.no_grad():
            logits = model(windows[:, :-1]).logits
            want = F.cross_entropy(logits.reshape(-1, 97), windows[:, 1:].reshape(-1)).item()
        print(f"[lora eval] --adapter loss {got:.7f} vs PEFT {want:.7f}")
        self.assertLess(abs(got - want) / want, 1e-6)
        merged = os.path.join(self.tmp, "merged_for_generate")
        subprocess.run([BIN, "merge-lora", "--base", self.base, "--adapter", self.adapter, "--output", merged],
                       check=True, capture_output=True)
        outs = []
        for args in (["--model", self.base, "--adapter", self.adapter], ["--model", merged]):
            r = subprocess.run([BIN, "generate", *args, "--prompt-ids", "5,17,42", "--max-new-tokens", "10",
                                "--temperature", "0", "--device", "cpu", "--json"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            outs.append(json.loads(r.stdout.strip().splitlines()[-1])["ids"])
        self.assertEqual(outs[0], outs[1])


if __name__ == "__main__":
    import unittest
    unittest.main()
