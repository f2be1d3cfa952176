"""Perimeter, round 3: hostile and unlucky inputs on the surfaces a user's files pass through.

- Damage: nothing the user had is overwritten or deleted (sha256 of every file before and
  after): output_dir = model.init_from, a config named config.json inside output_dir, init /
  merge-lora over a model, tokenize --train-sentencepiece over a tokenizer and shards, files
  beside checkpoints and shards, two processes on one folder.
- Non-finite values: NaN in an adapter, a float16 merge that overflows, a diverging step.
- Adapters applied in part: no targets, extra tensors, an unimplemented PEFT option, integer
  tensors.
- Tokenizer files: tokenizer.json without model.vocab, with a normalizer or a prefix space;
  merges.txt with CR line endings; .json inputs; paths with commas and spaces for SentencePiece.
- Flags and files: numbers out of range, FIFOs and devices where a file belongs.

Every refusal is one line naming what is wrong, exit 1 (or 2 for usage), never a crash.
Run by ctest (`perimeter.*`), which sets GPT2FT_BIN."""
import json
import os
import shutil
import subprocess
import time
import unittest

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import tokenizer_reference as tref
import train_reference as ref
from common import WorkDirTest, tree_hashes, write_shard

BIN = os.environ.get("GPT2FT_BIN", "")


def run(*args, timeout=300):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout)



class PerimeterTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = ref.make_model(os.path.join(cls.tmp, "model"))
        os.makedirs(os.path.join(cls.tmp, "data"))
        ref.make_stream(os.path.join(cls.tmp, "data", "train_000000.bin"))
        cls.glob = os.path.join(cls.tmp, "data", "train_*.bin")

    def config(self, out, **train):
        c = {"model": {"init_from": self.model, "dropout": 0.0},
             "data": {"train": self.glob, "seq_len": 16, "num_workers": 1},
             "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 3, "lr": 1e-3},
             "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out, "device": "cpu"}
        c["train"].update(train)
        return c

    def write_config(self, cfg, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    def assert_refused(self, r, *fragments, code=1):
        self.assertEqual(r.returncode, code, r.stderr[-3000:])
        for fragment in fragments:
            self.assertIn(fragment, r.stderr)
        self.assertNotIn("terminate called", r.stderr)
        self.assertNotIn("Exception raised from", r.stderr)  # libtorch's C++ stack text

    # --- damage ---------------------------------------------------------------------------

    def test_no_user_file_is_overwritten_or_deleted(self):
        # output_dir = the model it starts from
        model_copy = self.path("model_copy")
        shutil.copytree(self.model, model_copy)
        before = tree_hashes(model_copy)
        cfg = self.config(model_copy)
        cfg["model"]["init_from"] = model_copy
        r = run("--config", self.write_config(cfg, self.path("cfg", "same.json")))
        self.assert_refused(r, "output_dir is the folder of model.init_from")
        self.assertEqual(tree_hashes(model_copy), before)
        # the user's config named config.json inside output_dir: the run records train_config.json
        out = self.path("run")
        user_cfg = self.write_config(self.config(out), os.path.join(out, "config.json"))
        with open(user_cfg, "a") as f:
            f.write("\n")
        kept = tree_hashes(out)["config.json"]
        r = run("--config", user_cfg)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertEqual(tree_hashes(out)["config.json"], kept)
        self.assertTrue(os.path.exists(os.path.join(out, "train_config.json")))
        # init and merge-lora over a model folder
        target = self.path("target")
        shutil.copytree(self.model, target)
        before = tree_hashes(target)
        self.assert_refused(run("init", "--preset", "distilgpt2", "--output", target), "already holds a model",
                            "--overwrite")
        self.assertEqual(tree_hashes(target), before)
        adapter = self.path("adapter")
        self.make_adapter(adapter)
        self.assert_refused(run("merge-lora", "--base", self.model, "--adapter", adapter, "--output", target),
                            "already holds a model")
        self.assertEqual(tree_hashes(target), before)
        self.assertEqual(run("merge-lora", "--base", self.model, "--adapter", adapter, "--output", target,
                             "--overwrite").returncode, 0)
        # checkpoint pruning keeps what it did not write
        out = self.path("pruned")
        ckpts = os.path.join(out, "checkpoints")
        os.makedirs(os.path.join(ckpts, "step_00000001_backup"))
        for name in ("step_00000001_backup/notes.txt", ".tmp-notes.txt"):
            with open(os.path.join(ckpts, name), "w") as f:
                f.write("mine")
        cfg = self.config(out, max_steps=4)
        cfg["checkpoint"] = {"every_steps": 1, "keep_last": 1}
        r = run("--config", self.write_config(cfg, self.path("cfg", "pruned.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        left = sorted(os.listdir(ckpts))
        print(f"[perimeter] checkpoints/ after keep_last 1: {left}")
        self.assertIn("step_00000001_backup", left)
        self.assertIn(".tmp-notes.txt", left)
        self.assertEqual([n for n in left if n.startswith("step_") and len(n) == 13], ["step_00000004"])

    def make_adapter(self, folder, **config):
        """A PEFT-format adapter for self.model: targets c_attn, small random B (so it changes the model)."""
        os.makedirs(folder, exist_ok=True)
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["c_attn"],
               "bias": "none", "fan_in_fan_out": True, "base_model_name_or_path": self.model}
        cfg.update(config)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for i in range(2):
            p = f"base_model.model.transformer.h.{i}.attn.c_attn"
            tensors[f"{p}.lora_A.weight"] = torch.randn(2, 32, generator=g)
            tensors[f"{p}.lora_B.weight"] = torch.randn(96, 2, generator=g) * 0.01
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        return tensors

    def test_tokenize_checks_everything_before_writing_and_deletes_only_its_shards(self):
        text = self.path("corpus", "a.txt")
        with open(text, "w") as f:
            f.write(" ".join(tref.WORDS * 200))
        out = self.path("sp")
        r = run("tokenize", "--train-sentencepiece", "--vocab-size", 600, "--input", text, "--output-dir", out,
                "--val-fraction", 0, "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        before = tree_hashes(out)
        r = run("tokenize", "--train-sentencepiece", "--vocab-size", 580, "--input", text, "--output-dir", out,
                "--val-fraction", 0, "--no-progress")
        self.assert_refused(r, "already holds shards")
        self.assertEqual(tree_hashes(out), before, "the tokenizer beside the shards is the one that made them")
        # a file a train_*.bin glob would read, not written by tokenize: never deleted, never mixed in
        with open(os.path.join(out, "train_important.bin"), "wb") as f:
            f.write(b"mine")
        before = tree_hashes(out)
        r = run("tokenize", "--tokenizer", os.path.join(out, "tokenizer.model"), "--input", text, "--output-dir", out,
                "--overwrite", "--val-fraction", 0, "--no-progress")
        self.assert_refused(r, "train_important.bin", "not a shard its manifest.json records")
        self.assertEqual(tree_hashes(out), before)
        # paths with a comma and a space go to SentencePiece as data, not as flags or file lists
        odd = self.path("odd dir", "a,b --vocab_size=7.txt")
        shutil.copy(text, odd)
        r = run("tokenize", "--train-sentencepiece", "--vocab-size", 600, "--input", odd, "--output-dir",
                self.path("odd out"), "--val-fraction", 0, "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        import sentencepiece as spm
        self.assertEqual(spm.SentencePieceProcessor(model_file=self.path("odd out", "tokenizer.model")).get_piece_size(),
                         600)
        # .json is not text to tokenize; .JSONL is .jsonl
        as_json = self.path("corpus", "docs.json")
        with open(as_json, "w") as f:
            json.dump([{"text": "a"}], f)
        self.assert_refused(run("tokenize", "--tokenizer", os.path.join(out, "tokenizer.model"), "--input", as_json,
                                "--output-dir", self.path("json_out"), "--no-progress"), "a .json file", ".jsonl")
        upper = self.path("corpus", "docs.JSONL")
        with open(upper, "w") as f:
            f.write(json.dumps({"text": "the the the"}) + "\n" + json.dumps({"text": "don't"}) + "\n")
        r = run("tokenize", "--tokenizer", os.path.join(out, "tokenizer.model"), "--input", upper, "--output-dir",
                self.path("upper_out"), "--val-fraction", 0, "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn("2 documents", r.stderr)

    def test_two_processes_never_write_one_folder(self):
        out = self.path("busy")
        cfg = self.write_config(self.config(out, max_steps=100000), self.path("cfg", "long.json"))
        first = subprocess.Popen([BIN, "--config", cfg], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            metrics = os.path.join(out, "metrics.jsonl")
            deadline = time.time() + 120
            while time.time() < deadline and not os.path.exists(metrics):
                time.sleep(0.05)
            second = run("--config", self.write_config(self.config(out, max_steps=2), self.path("cfg", "second.json")))
            print(f"[perimeter] second run on a busy output_dir: {second.stderr.strip().splitlines()[-1][:200]}")
            self.assert_refused(second, "is in use by another gpt2-finetune process (pid", str(first.pid))
            self.assertIsNone(first.poll(), "the first run goes on")
        finally:
            first.terminate()
            first.communicate(timeout=120)
        self.assertEqual(first.returncode, 76)  # stopped by the signal, checkpointed
        r = run("--config", self.write_config(self.config(out, max_steps=first_steps_plus(out, 1)),
                                             self.path("cfg", "after.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertFalse(os.path.exists(os.path.join(out, ".gpt2ft-lock")), "released and removed at the end")

    # --- non-finite values ----------------------------------------------------------------

    def test_non_finite_values_are_stopped(self):
        # an adapter holding NaN
        adapter = self.path("nan_adapter")
        tensors = self.make_adapter(adapter)
        key = next(iter(tensors))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"))
        write_shard(self.path("val", "val_000000.bin"), np.arange(40) % 97)
        self.assert_refused(run("eval", "--model", self.model, "--adapter", adapter, "--data",
                                self.path("val", "val_*.bin"), "--seq-len", 16, "--device", "cpu"),
                            key, "NaN or infinite")
        # a float16 merge that overflows: refused, nothing written
        big = self.path("big_adapter")
        tensors = self.make_adapter(big)
        for k in tensors:
            if "lora_B" in k:
                tensors[k] = torch.full_like(tensors[k], 300.0)
            else:
                tensors[k] = torch.full_like(tensors[k], 300.0)
        save_file(tensors, os.path.join(big, "adapter_model.safetensors"))
        merged = self.path("merged16")
        self.assert_refused(run("merge-lora", "--base", self.model, "--adapter", big, "--output", merged,
                                "--dtype", "float16"), "float16", "bfloat16 or float32")
        self.assertFalse(os.path.exists(os.path.join(merged, "model.safetensors")))
        # a step whose loss turns NaN: not applied, the run stops with the last checkpoint intact
        out = self.path("diverged")
        cfg = self.config(out, max_steps=6)
        cfg["checkpoint"] = {"every_steps": 2}
        with open(self.path("cfg_nan.json"), "w") as f:
            json.dump(cfg, f)
        r = subprocess.run([BIN, "--config", self.path("cfg_nan.json")], capture_output=True, text=True,
                           env=dict(os.environ, GPT2FT_FAULT_NAN_AT_STEP="3"), timeout=300)
        print(f"[perimeter] NaN at step 3: exit {r.returncode}: {r.stderr.strip().splitlines()[-1][:240]}")
        self.assert_refused(r, "NaN or infinite in 1 step(s)", "step_00000002")
        self.assertFalse(os.path.exists(os.path.join(out, "final")))
        self.assertEqual(open(os.path.join(out, "checkpoints", "latest")).read().strip(), "step_00000002")
        last = load_file(os.path.join(out, "checkpoints", "step_00000002", "model.safetensors"))
        self.assertTrue(all(torch.isfinite(t).all() for t in last.values()))
        # in-range options that made AdamW's update non-finite are out of range now
        for key, value in (("train.betas", "[1,1]"), ("train.eps", "0"), ("train.weight_decay", "1e308"),
                           ("train.lr", "1e308"), ("model.lora.alpha", "1e308")):
            r = run("--config", self.path("cfg_nan.json"), "--set", f"{key}={value}", "--print-config")
            self.assert_refused(r, key)

    # --- adapters -------------------------------------------------------------------------

    def test_adapters_are_applied_whole_or_refused(self):
        write_shard(self.path("val", "val_000000.bin"), np.arange(40) % 97)
        val = self.path("val", "val_*.bin")
        cases = {
            "no targets": ({"target_modules": []}, None, "target_modules is empty"),
            "an option not implemented": ({"layer_replication": [[0, 1]]}, None, "layer_replication"),
            "an extra module": ({}, "extra", "tensor(s) this base model"),
            "a deeper base": ({}, "deeper", "tensor(s) this base model"),
            "integer tensors": ({}, "int", "is stored as I64"),
        }
        for name, (config, change, fragment) in cases.items():
            with self.subTest(name):
                folder = self.path(name.replace(" ", "_"))
                tensors = self.make_adapter(folder, **config)
                if change == "extra":
                    tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(2, 32)
                elif change == "deeper":
                    tensors["base_model.model.transformer.h.5.attn.c_attn.lora_A.weight"] = torch.zeros(2, 32)
                elif change == "int":
                    key = next(iter(tensors))
                    tensors[key] = torch.zeros_like(tensors[key], dtype=torch.int64)
                save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
                r = run("eval", "--model", self.model, "--adapter", folder, "--data", val, "--seq-len", 16,
                        "--device", "cpu")
                self.assert_refused(r, fragment)
                r = run("merge-lora", "--base", self.model, "--adapter", folder, "--output", self.path("m_" + name))
                self.assert_refused(r, fragment)

    # --- tokenizer files ------------------------------------------------------------------

    def test_tokenizer_files_are_implemented_exactly_or_refused(self):
        d = self.path("bpe")
        tref.train_test_bpe(d, vocab_size=400)
        from tokenizers import Tokenizer
        from tokenizers.models import BPE
        hf = Tokenizer(BPE.from_file(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")))
        from tokenizers import pre_tokenizers, decoders
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        tj = json.loads(hf.to_str())
        text = self.path("t.txt")
        with open(text, "w") as f:
            f.write("the quick brown fox")

        def tokenize_with(name, doc):
            folder = self.path(name)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                json.dump(doc, f)
            return run("tokenize", "--tokenizer", folder, "--input", text, "--output-dir", self.path(name + "_out"),
                       "--no-progress")

        self.assertEqual(tokenize_with("plain", tj).returncode, 0)
        no_vocab = json.loads(json.dumps(tj))
        del no_vocab["model"]["vocab"]
        self.assert_refused(tokenize_with("no_vocab", no_vocab), "model.vocab")
        no_merges = json.loads(json.dumps(tj))
        del no_merges["model"]["merges"]  # transformers refuses it too
        self.assert_refused(tokenize_with("no_merges", no_merges), "model.merges: expected a list of merges, found none")
        # A manifest whose tokenizer kind disagrees with its identity is damaged, not believed.
        manifest_path = self.path("plain_out", "manifest.json")
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["tokenizer"]["kind"] = "sentencepiece"
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        r = run("eval", "--model", self.model, "--data", self.path("plain_out", "train_*.bin"), "--seq-len", 4,
                "--device", "cpu")
        self.assert_refused(r, "manifest.json: tokenizer.kind \"sentencepiece\" disagrees with tokenizer.identity")
        self.assert_refused(tokenize_with("normalizer", dict(tj, normalizer={"type": "Lowercase"})), "normalizer")
        prefix = dict(tj, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                         "use_regex": True})
        self.assert_refused(tokenize_with("prefix", prefix), "pre_tokenizer")
        # merges.txt with CR-only line endings: the same merges, not none
        cr = self.path("cr")
        os.makedirs(cr)
        shutil.copy(os.path.join(d, "vocab.json"), cr)
        with open(os.path.join(d, "merges.txt"), "rb") as f:
            merges = f.read()
        with open(os.path.join(cr, "merges.txt"), "wb") as f:
            f.write(merges.replace(b"\r\n", b"\n").replace(b"\n", b"\r"))
        strings = [b"the quick brown fox jumps", b"don't stop"]
        os.makedirs(self.path("lf"), exist_ok=True)
        os.makedirs(self.path("crt"), exist_ok=True)
        ours_lf, _ = tref.run_tool(os.environ["GPT2FT_TOKENIZER_TOOL"], d, strings, self.path("lf"))
        ours_cr, info = tref.run_tool(os.environ["GPT2FT_TOKENIZER_TOOL"], cr, strings, self.path("crt"))
        print(f"[perimeter] merges.txt with CR line endings: {info}")
        self.assertEqual([r["ids"] for r in ours_cr], [r["ids"] for r in ours_lf])

    # --- flags and files ------------------------------------------------------------------

    def test_flags_have_ranges_and_files_must_be_regular(self):
        write_shard(self.path("v", "val_000000.bin"), np.arange(40) % 97)
        val = self.path("v", "val_*.bin")
        usage = [
            ["generate", "--model", self.model, "--prompt-ids", "1", "--temperature", "nan"],
            ["generate", "--model", self.model, "--prompt-ids", "1", "--temperature", "1e-45"],
            ["generate", "--model", self.model, "--prompt-ids", "1", "--top-p", "-1"],
            ["generate", "--model", self.model, "--prompt-ids", "1", "--max-new-tokens", "-100"],
            ["generate", "--model", self.model, "--prompt-ids", "1", "--top-k", "-1"],
            ["generate", "--model", self.model, "--prompt-ids", "1", "--seed", "-1"],
            ["eval", "--model", self.model, "--data", val, "--batch-size", "1e12"],
            ["eval", "--model", self.model, "--data", val, "--max-sequences", "-1"],
            ["tokenize", "--tokenizer", self.model, "--input", "x.txt", "--output-dir", "o", "--workers", "100000"],
            ["tokenize", "--tokenizer", self.model, "--input", "x.txt", "--output-dir", "o", "--shard-tokens", "1e23"],
            ["train"],
        ]
        for args in usage:
            with self.subTest(args=args):
                self.assert_refused(run(*args), code=2)
        errors = [
            (["generate", "--model", self.model, "--prompt-ids", "1.5"], "--prompt-ids"),
            (["generate", "--model", self.model, "--prompt-ids", "0x10"], "--prompt-ids"),
            (["generate", "--model", self.model, "--prompt-ids", "1", "--device", "cuda:99999999999"], "cuda:N"),
            (["plan", "--config", self.write_config(self.config(self.path("p")), self.path("cfg", "plan.json")),
              "--gpu-memory", "1e30GiB"], "1 PiB"),
            (["plan", "--config", self.path("cfg", "plan.json"), "--gpu-memory", "inf"], "--gpu-memory"),
        ]
        for args, fragment in errors:
            with self.subTest(args=args):
                self.assert_refused(run(*args), fragment)
        # A FIFO or a device where a config, adapter or checkpoint pointer belongs: an error, not
        # a hang or an endless read.
        fifo = self.path("fifo.json")
        os.mkfifo(fifo)
        self.assert_refused(run("--config", fifo, timeout=30), "not a regular file")
        adapter = self.path("fifo_adapter")
        self.make_adapter(adapter)
        os.remove(os.path.join(adapter, "adapter_config.json"))
        os.mkfifo(os.path.join(adapter, "adapter_config.json"))
        self.assert_refused(run("eval", "--model", self.model, "--adapter", adapter, "--data", val, "--seq-len", 16,
                                "--device", "cpu", timeout=30), "not a regular file")
        out = self.path("zero")
        os.makedirs(os.path.join(out, "checkpoints"))
        os.symlink("/dev/zero", os.path.join(out, "checkpoints", "latest"))
        r = run("--config", self.write_config(self.config(out), self.path("cfg", "zero.json")), timeout=60)
        self.assert_refused(r, "latest", "not a regular file")
        # a NUL in a path
        cfg = self.config("out\u0000x")
        self.assert_refused(run("--config", self.write_config(cfg, self.path("cfg", "nul.json")), "--print-config"),
                            "output_dir", "NUL")


def first_steps_plus(out, more):
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        return int(f.read().strip()[len("step_"):]) + more


if __name__ == "__main__":
    unittest.main()
