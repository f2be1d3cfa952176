"""Perimeter, round 4: the surfaces added for instruction data, document shards, run tracking,
8-bit AdamW state and run fingerprints.

- Damage: a new run never writes among another run's checkpoints, and never replaces another
  run's best/ (sha256 of every file before and after).
- Fingerprints: an empty fingerprint, or one missing a field, is a difference, not a pass.

Every refusal names what is wrong and where, exit 1, never a crash.
Run by ctest (`perimeter.*`), which sets GPT2FT_BIN."""
import json
import os
import shutil

import sys

import numpy as np

import train_reference as ref
from common import tree_hashes
from test_instruction import train_tokenizer
from test_perimeter import PerimeterTest, run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "bench"))
from instruction_bench import write_document_shard  # noqa: E402  (the document shard writer in numpy)


class Perimeter4Test(PerimeterTest):
    def tracked_config(self, out, **train):
        """Validation every step, best/ kept, a checkpoint every step."""
        c = self.config(out, **train)
        val = os.path.join(self.tmp, "val", "val_000000.bin")
        if not os.path.exists(val):
            os.makedirs(os.path.dirname(val), exist_ok=True)
            ref.make_stream(val, n=200, seed=7)
        c["data"]["val"] = val
        c["eval"] = {"every_steps": 1}
        c["checkpoint"] = {"every_steps": 1, "keep_best": True, "resume": "auto"}
        return c

    def test_a_new_run_never_writes_among_another_runs_files(self):
        out = self.path("run_a")
        cfg = self.tracked_config(out)
        r = run("--config", self.write_config(cfg, self.path("cfg", "a.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertTrue(os.path.exists(os.path.join(out, "best", "best.json")))
        before = tree_hashes(out)

        # checkpoint.resume "none" in a folder holding checkpoints: refused, nothing touched.
        cfg_none = json.loads(json.dumps(cfg))
        cfg_none["checkpoint"]["resume"] = "none"
        r = run("--config", self.write_config(cfg_none, self.path("cfg", "none.json")))
        self.assert_refused(r, "holds checkpoints of an earlier run", "another output_dir", "checkpoint.resume \"auto\"")
        self.assertEqual(tree_hashes(out), before)

        # Another run's best/ (with its best.json) in a fresh folder: refused, whether the
        # config differs or not (a fresh run is never the run that wrote it).
        for name, lr in (("other_lr", 3e-3), ("same_config", 1e-3)):
            fresh = self.path(f"fresh_{name}")
            shutil.copytree(os.path.join(out, "best"), os.path.join(fresh, "best"))
            kept = tree_hashes(fresh)
            c = self.tracked_config(fresh, lr=lr)
            r = run("--config", self.write_config(c, self.path("cfg", f"fresh_{name}.json")))
            self.assert_refused(r, os.path.join(fresh, "best"), "best model of another run", "Move it away")
            if lr != 1e-3:
                self.assertIn("train.lr", r.stderr)
            self.assertEqual(tree_hashes(fresh), kept, name)

        # A best.json whose fingerprint is missing or empty is not this run's either.
        for name, edit in (("no_fingerprint", lambda b: b.pop("fingerprint")),
                           ("empty_fingerprint", lambda b: b.update(fingerprint={}))):
            copy = self.path(f"copy_{name}")
            shutil.copytree(out, copy)
            with open(os.path.join(copy, "best", "best.json")) as f:
                best = json.load(f)
            edit(best)
            with open(os.path.join(copy, "best", "best.json"), "w") as f:
                json.dump(best, f)
            kept = tree_hashes(copy)
            c = self.tracked_config(copy, max_steps=4)
            r = run("--config", self.write_config(c, self.path("cfg", f"{name}.json")))
            self.assert_refused(r, "best model of another run", "the run fingerprint")
            self.assertEqual(tree_hashes(copy), kept, name)

        # The same run resumed keeps its best/ and goes on.
        cfg_more = self.tracked_config(out, max_steps=4)
        r = run("--config", self.write_config(cfg_more, self.path("cfg", "more.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("resumed from", r.stderr)

    def test_a_damaged_fingerprint_does_not_turn_the_check_off(self):
        out = self.path("run")
        cfg = self.tracked_config(out)
        cfg["checkpoint"]["keep_best"] = False
        r = run("--config", self.write_config(cfg, self.path("cfg", "run.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        last = os.path.join("checkpoints", sorted(os.listdir(os.path.join(out, "checkpoints")))[-1])
        state_path = os.path.join(out, last, "trainer_state.json")
        with open(state_path) as f:
            state = json.load(f)
        fields = sorted(state["fingerprint"])
        self.assertIn("train.lr", fields)
        changed = dict(cfg, train=dict(cfg["train"], lr=5e-3, max_steps=4))
        for name, fingerprint, expect in (
                ("empty", {}, "the run fingerprint: expected an object"),
                ("without_lr", {k: v for k, v in state["fingerprint"].items() if k != "train.lr"},
                 "train.lr: not recorded in the checkpoint's fingerprint")):
            copy = self.path(f"copy_{name}")
            shutil.copytree(out, copy)
            with open(os.path.join(copy, last, "trainer_state.json"), "w") as f:
                json.dump(dict(state, fingerprint=fingerprint), f)
            kept = tree_hashes(copy)
            r = run("--config", self.write_config(dict(changed, output_dir=copy), self.path("cfg", f"{name}.json")))
            self.assert_refused(r, "holds a checkpoint of another run", expect)
            self.assertEqual(tree_hashes(copy), kept, name)

    def test_nothing_to_train_on_is_an_error(self):
        # tokenize: an empty input, only blank lines, only bad lines skipped.
        tok = self.path("tok")
        inputs = {"empty.txt": "", "blank.txt": "\n  \n\t\n", "blank.jsonl": "\n\n",
                  "bad.jsonl": '{"prompt": 1, "completion": "a"}\n\n{"x": 2}\n'}
        train_tokenizer(tok, ["some text to learn a few merges from", "and a little more"])
        for name, text in inputs.items():
            path = self.path("inputs", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            out = self.path(f"shards_{name}")
            args = ["tokenize", "--tokenizer", tok, "--input", path, "--output-dir", out, "--no-progress"]
            if name == "bad.jsonl":
                args += ["--prompt-field", "prompt", "--completion-field", "completion", "--skip-bad-lines"]
            r = run(*args)
            self.assert_refused(r, "no document to write", name, "Nothing was written")
            self.assertFalse(os.path.exists(out), name)

        # Document shards with no target at data.seq_len (16): refused before the first step.
        rng = np.random.default_rng(1)
        cases = {
            "no_target_bit": (np.full(12, 20), lambda lengths: np.zeros(int(lengths.sum()), bool)),
            # every target beyond the 17 tokens a row keeps: the completions are cut away
            "completions_cut": (np.full(12, 30), lambda lengths: np.concatenate(
                [np.arange(n) >= 20 for n in lengths])),
        }
        for name, (lengths, targets_of) in cases.items():
            folder = self.path(f"docs_{name}")
            os.makedirs(folder)
            write_document_shard(os.path.join(folder, "train_000000.bin"), rng.integers(0, 96, int(lengths.sum())),
                                 np.concatenate([[0], np.cumsum(lengths)[:-1]]), targets_of(lengths))
            cfg = self.config(self.path(f"run_{name}"))
            cfg["data"]["train"] = os.path.join(folder, "train_*.bin")
            r = run("--config", self.write_config(cfg, self.path("cfg", f"{name}.json")))
            self.assert_refused(r, "data.train: no sample of", "holds a target at data.seq_len 16")
            self.assertFalse(os.path.exists(os.path.join(self.path(f"run_{name}"), "final")), name)

        # Some rows have targets, the first global batch none (rows in order: long documents
        # without targets fill the first rows alone): an error at that step, not a zero loss.
        folder = self.path("docs_first_batch")
        os.makedirs(folder)
        lengths = np.array([17] * 4 + [5] * 12)
        targets = np.concatenate([np.zeros(17 * 4, bool), np.ones(5 * 12, bool)])
        write_document_shard(os.path.join(folder, "train_000000.bin"), rng.integers(0, 96, int(lengths.sum())),
                             np.concatenate([[0], np.cumsum(lengths)[:-1]]), targets)
        cfg = self.config(self.path("run_first_batch"))
        cfg["data"].update({"train": os.path.join(folder, "train_*.bin"), "shuffle": False})
        r = run("--config", self.write_config(cfg, self.path("cfg", "first_batch.json")))
        self.assert_refused(r, "the global batch of step 1 (4 samples from sample 0 of epoch 0) holds no target")
        self.assertFalse(os.path.exists(os.path.join(self.path("run_first_batch"), "final")))

    def test_a_document_shard_whose_header_disagrees_with_its_sections_is_refused(self):
        from instruction_bench import checksum, document_shard_bytes
        rng = np.random.default_rng(2)
        lengths = np.full(9, 11)  # 99 tokens: odd, so one more fits in the alignment padding
        tokens = rng.integers(0, 96, int(lengths.sum()))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        targets = rng.random(tokens.size) < 0.5
        good = document_shard_bytes(tokens, starts, targets)
        header = np.frombuffer(good[:1024], dtype="<i4").copy()
        sections = good[1024 + (2 * tokens.size + 3) // 4 * 4:]

        def train_on(name, data):
            folder = self.path(name)
            os.makedirs(folder)
            with open(os.path.join(folder, "train_000000.bin"), "wb") as f:
                f.write(data)
            cfg = self.config(self.path(f"run_{name}"), max_steps=1)
            cfg["data"]["train"] = os.path.join(folder, "train_*.bin")
            return run("--config", self.write_config(cfg, self.path("cfg", f"{name}.json")))

        self.assertEqual(train_on("good", good).returncode, 0)
        # One token more in the header: the size, the alignment and the target bits all still fit.
        more = header.copy()
        more[2] += 1
        self.assert_refused(train_on("one_more", more.tobytes() + good[1024:]),
                            "the header's counts, the document starts or the target bits do not match")
        # A version 1 shard (checksum of the sections alone) still reads.
        v1 = header.copy()
        v1[1] = 1
        v1[5:7] = np.array([checksum(sections) & 0xFFFFFFFF, checksum(sections) >> 32], dtype="<u4").view("<i4")
        r = train_on("version_1", v1.tobytes() + good[1024:])
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])

    def test_fifos_small_vocabularies_and_a_missing_best_are_named(self):
        # A FIFO named by the shard glob: plan and the "auto" settings refuse it, never hang.
        folder = self.path("fifo")
        os.makedirs(folder, exist_ok=True)
        os.mkfifo(os.path.join(folder, "train_000000.bin"))
        cfg = self.config(self.path("run_fifo"))
        cfg["data"]["train"] = os.path.join(folder, "train_*.bin")
        cfg["train"].update({"micro_batch_size": "auto"})
        path = self.write_config(cfg, self.path("cfg", "fifo.json"))
        for args in (("plan", "--config", path), ("--config", path)):
            r = run(*args, timeout=60)
            self.assert_refused(r, "train_000000.bin: not a regular file")
        # SentencePiece with a vocabulary below the characters it must hold: the size to use.
        text = self.path("sp", "pairs.jsonl")
        os.makedirs(os.path.dirname(text), exist_ok=True)
        with open(text, "w") as f:
            f.write(json.dumps({"prompt": "hello world, what a day", "completion": "indeed it is"}) + "\n")
        r = run("tokenize", "--train-sentencepiece", "--vocab-size", 20, "--input", text, "--prompt-field", "prompt",
                "--completion-field", "completion", "--output-dir", self.path("sp", "out"), "--no-progress")
        self.assert_refused(r, "--vocab-size 20 is too small for this text", "or more")
        self.assertNotIn("trainer_interface.cc", r.stderr)
        # best/ gone from a run that names it: the resumed run says so, and its last line does not
        # name a best/ that is not there.
        out = self.path("run_best")
        cfg = self.tracked_config(out, max_steps=2)
        r = run("--config", self.write_config(cfg, self.path("cfg", "best.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        shutil.rmtree(os.path.join(out, "best"))
        cfg = self.tracked_config(out, max_steps=3, lr=1e-3)
        cfg["eval"]["every_steps"] = 100  # no validation before the end: nothing rewrites best/ on the way
        r = run("--config", self.write_config(cfg, self.path("cfg", "best_more.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn(os.path.join(out, "best") + " is missing: the checkpoint names a best model", r.stderr)
        done = [line for line in r.stderr.splitlines() if "done:" in line][-1]
        if not os.path.exists(os.path.join(out, "best", "best.json")):
            self.assertNotIn(os.path.join(out, "best"), done)

    def test_options_that_can_never_act_are_refused(self):
        out = self.path("run")
        for name, edit, expect in (
                ("keep_best", lambda c: c.update(checkpoint={"keep_best": True}), "checkpoint.keep_best needs validation data"),
                ("patience", lambda c: c.update(eval={"every_steps": 1, "early_stopping_patience": 2}),
                 "eval.early_stopping_patience needs validation data"),
                ("final_only", lambda c: (c["data"].update(val=self.glob),
                                          c.update(eval={"every_steps": 0, "early_stopping_patience": 2})),
                 "eval.every_steps 0 validates once")):
            cfg = self.config(out)
            edit(cfg)
            r = run("--config", self.write_config(cfg, self.path("cfg", f"{name}.json")))
            self.assert_refused(r, expect)
            self.assertFalse(os.path.exists(out), name)

    def test_a_resumed_optimizer_state_has_its_exact_dtypes_ranges_and_step_counts(self):
        from instruction_bench import checksum
        import torch
        from safetensors.torch import load_file, save_file
        out = self.path("run")
        cfg = self.tracked_config(out, max_steps=2, optimizer="adamw_8bit")
        cfg["checkpoint"]["keep_best"] = False
        r = run("--config", self.write_config(cfg, self.path("cfg", "run.json")))
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        last = os.path.join("checkpoints", sorted(os.listdir(os.path.join(out, "checkpoints")))[-1])
        tensors = load_file(os.path.join(out, last, "trainer_state.safetensors"))
        codes = next(k for k in tensors if k.startswith("adamw8bit.exp_avg.") and ".scales." not in k
                     and tensors[k].dtype == torch.uint8)
        scales = next(k for k in tensors if k.startswith("adamw8bit.exp_avg.scales."))
        step = next(k for k in tensors if k.startswith("adamw8bit.step."))
        rng = next(k for k in tensors if k.startswith("rng."))

        def damaged(name, edit, *expect, fresh_checksum=True):
            copy = self.path(f"copy_{name}")
            shutil.copytree(out, copy)
            state = dict(tensors)
            edit(state)
            path = os.path.join(copy, last, "trainer_state.safetensors")
            save_file(state, path)
            meta_path = os.path.join(copy, last, "trainer_state.json")
            with open(meta_path) as f:
                meta = json.load(f)
            with open(path, "rb") as f:
                meta["checksums"]["trainer_state.safetensors"] = f"{checksum(f.read()):016x}"
            if not fresh_checksum:
                del meta["checksums"]["trainer_state.safetensors"]
            with open(meta_path, "w") as f:
                json.dump(meta, f)
            r = run("--config", self.write_config(dict(cfg, output_dir=copy, train=dict(cfg["train"], max_steps=4)),
                                                  self.path("cfg", f"{name}.json")))
            self.assert_refused(r, *expect)
            self.assertFalse(os.path.exists(os.path.join(copy, "final")) and
                             os.path.getmtime(os.path.join(copy, "final")) > os.path.getmtime(meta_path), name)
            return r

        damaged("codes_int16", lambda t: t.update({codes: t[codes].to(torch.int16) + 300}),
                f'"{codes}" is I16, expected U8')
        damaged("scales_float64", lambda t: t.update({scales: t[scales].double()}), f'"{scales}" is F64, expected F32')
        damaged("scales_negative", lambda t: t.update({scales: -t[scales]}), "negative or non-finite scale")
        damaged("scales_nan", lambda t: t.update({scales: t[scales] * float("nan")}), f"\"{scales}\" holds NaN or infinite values")
        for value in (0.0, 0.5, 1e9):
            damaged(f"step_{value}", lambda t: t.update({step: torch.full_like(t[step], value)}),
                    f'"{step}" is {value:g}, expected a whole number of steps from 1 to the checkpoint\'s step 2')
        r = damaged("scales_huge", lambda t: t.update({scales: torch.full_like(t[scales], 1e38)}), "")
        self.assertTrue("NaN" in r.stderr or "non-finite" in r.stderr or "nan" in r.stderr, r.stderr[-2000:])
        damaged("rng", lambda t: t.update({rng: torch.randint(0, 255, (7,), dtype=torch.uint8)}),
                "trainer_state.safetensors: the random number generator state", "Resume from the checkpoint before")
        damaged("unlisted", lambda t: None, "no checksum for trainer_state.safetensors", fresh_checksum=False)

    def test_values_out_of_range_are_refused_with_their_range(self):
        from safetensors.torch import save_file
        import torch
        # An adapter whose lora_alpha would overflow: eval and merge-lora refuse it by name.
        folder = self.path("adapter")
        save_file(self.make_adapter(folder, lora_alpha=1e308), os.path.join(folder, "adapter_model.safetensors"))
        val = os.path.join(self.tmp, "data", "train_*.bin")
        r = run("eval", "--model", self.model, "--adapter", folder, "--data", val, "--seq-len", 16, "--device", "cpu")
        self.assert_refused(r, "lora_alpha must be in (0, 10000], got 1e+308")
        r = run("merge-lora", "--base", self.model, "--adapter", folder, "--output", self.path("merged"))
        self.assert_refused(r, "lora_alpha must be in (0, 10000]")
        self.assertFalse(os.path.exists(self.path("merged")))
        # train.grad_clip far beyond any gradient norm
        cfg = self.config(self.path("run"), grad_clip=1e308)
        r = run("--config", self.write_config(cfg, self.path("cfg", "clip.json")))
        self.assert_refused(r, "train.grad_clip")
        self.assertFalse(os.path.exists(self.path("run")))
        # generate --seed beyond 2^63 - 1 would wrap
        r = run("generate", "--model", self.model, "--prompt", "a", "--seed", 2**64, "--device", "cpu")
        self.assert_refused(r, "--seed", "not in range", code=2)
        # plan for a GPU of a byte, or of 1e-30 GiB
        cfg_path = self.write_config(self.config(self.path("plan")), self.path("cfg", "plan.json"))
        for size in ("1", "1e-30GiB", "900MiB"):
            r = run("plan", "--config", cfg_path, "--gpu-memory", size)
            self.assert_refused(r, "--gpu-memory")
        # A .jsonl pair with a NUL byte before or after its JSON object is a bad line, counted once.
        tok = self.path("tok")
        train_tokenizer(tok, ["some text to learn a few merges from", "and a little more"])
        good = '{"prompt": "a", "completion": "b"}'
        for name, line in (("before", "\0" + good), ("after", good + "\0"), ("inside", good[:5] + "\0" + good[5:])):
            path = self.path("nul", f"{name}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(good + "\n" + line + "\n")
            args = ["tokenize", "--tokenizer", tok, "--input", path, "--prompt-field", "prompt", "--completion-field",
                    "completion", "--no-progress"]
            r = run(*args, "--output-dir", self.path("nul", f"out_{name}"))
            self.assert_refused(r, f"{name}.jsonl:2: holds a NUL byte")
            r = run(*args, "--output-dir", self.path("nul", f"skipped_{name}"), "--skip-bad-lines")
            self.assertEqual(r.returncode, 0, r.stderr[-2000:])
            with open(self.path("nul", f"skipped_{name}", "manifest.json")) as f:
                manifest = json.load(f)
            self.assertEqual(manifest["skipped_lines"], 1, name)
            self.assertEqual(manifest["pairs"]["train"] + manifest["pairs"]["val"], 1, name)


if __name__ == "__main__":
    import unittest
    unittest.main()
