"""Run integrity: what a run trains and reports never changes silently.

- A reused output_dir holding another run's checkpoints (another model, other data) is
  refused with what differs and the two ways out, and nothing of the old run is touched; what a
  user legitimately changes on resume (the micro batch, max_steps) resumes; checkpoint.resume
  "continue" takes the old checkpoint anyway, with a warning.
- Shards made by another tokenizer than the model's are refused by train and eval, naming both;
  shards of the model's own tokenizer train.

Run by ctest (`integrity.*`), which sets GPT2FT_BIN."""
import json
import os
import subprocess
import unittest

import tokenizer_reference as tref
import train_reference as ref
from common import WorkDirTest, tree_hashes

BIN = os.environ.get("GPT2FT_BIN", "")


def run(cfg, workdir, name):
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)



class RunIntegrityTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model1 = ref.make_model(os.path.join(cls.tmp, "model1"), seed=0)
        cls.model2 = ref.make_model(os.path.join(cls.tmp, "model2"), seed=1)  # same shape, other weights
        for name, seed in (("data1", 0), ("data2", 5)):
            os.makedirs(os.path.join(cls.tmp, name))
            ref.make_stream(os.path.join(cls.tmp, name, "train_000000.bin"), seed=seed)

    def config(self, out, model=None, data="data1", **train):
        c = {"model": {"init_from": model or self.model1, "dropout": 0.0},
             "data": {"train": os.path.join(self.tmp, data, "train_*.bin"), "seq_len": 16, "num_workers": 1},
             "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 3, "lr": 1e-3},
             "checkpoint": {"every_steps": 1},
             "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out, "device": "cpu"}
        c["train"].update(train)
        return c

    def test_a_reused_output_dir_never_continues_another_run(self):
        out = self.path("run")
        r = run(self.config(out), self.tmp, "first")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        before = tree_hashes(out)
        cases = {
            "another model": (self.config(out, model=self.model2, max_steps=6), ["model.init_from: was", "model weights"]),
            "other data": (self.config(out, data="data2", max_steps=6), ["data.train: was", "data.train shards"]),
            "another lr": (self.config(out, max_steps=6, lr=5e-4), ["train.lr: was"]),
        }
        for name, (cfg, named) in cases.items():
            with self.subTest(name):
                r = run(cfg, self.tmp, name.replace(" ", "_"))
                print(f"[integrity] reused output_dir, {name}: exit {r.returncode}: "
                      f"{r.stderr.strip().splitlines()[-1][:160] if r.stderr.strip() else ''}")
                self.assertEqual(r.returncode, 1, r.stderr[-2000:])
                self.assertIn("holds a checkpoint of another run", r.stderr)
                for text in named + ["Use a new output_dir", "\"continue\""]:
                    self.assertIn(text, r.stderr)
                self.assertNotIn("Traceback", r.stderr)
                self.assertEqual(tree_hashes(out), before, "the old run's files are untouched")
        # What a user changes on resume is not a different run: a smaller micro batch (the
        # out-of-memory restart) and more steps.
        r = run(self.config(out, micro_batch_size=1, max_steps=5), self.tmp, "resume_smaller_micro")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn("resumed from", r.stderr)
        # "continue" takes another run's checkpoint on purpose, listing what changed.
        r = run(dict(self.config(out, model=self.model2, max_steps=7), checkpoint={"resume": "continue"}),
                self.tmp, "continue_anyway")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn("although the run changed", r.stderr)
        self.assertIn("model.init_from: was", r.stderr)
        with open(os.path.join(out, "train_config.json")) as f:
            self.assertEqual(json.load(f)["model"]["init_from"], self.model2, "the record says what it continued with")

    def test_shards_of_another_tokenizer_are_refused(self):
        tok_a, tok_b = self.path("tok_a"), self.path("tok_b")
        tref.train_test_bpe(tok_a, vocab_size=400, seed=11)
        tref.train_test_bpe(tok_b, vocab_size=400, seed=12)
        with open(os.path.join(tok_a, "vocab.json"), encoding="utf-8") as f:
            vocab = len(json.load(f))
        shape = self.path("shape.json")
        with open(shape, "w") as f:
            json.dump({"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": vocab, "n_positions": 32}, f)
        model = self.path("model_a")
        r = subprocess.run([BIN, "init", "--config-json", shape, "--tokenizer", tok_a, "--output", model],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        text = self.path("text.txt")
        with open(text, "w") as f:
            f.write(" ".join(tref.WORDS) * 40)
        shards = {}
        for name, tok in (("a", tok_a), ("b", tok_b)):
            shards[name] = self.path(f"shards_{name}")
            r = subprocess.run([BIN, "tokenize", "--tokenizer", tok, "--input", text, "--output-dir", shards[name],
                                "--val-fraction", "0"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
        base = {"model": {"init_from": model}, "data": {"seq_len": 16},
                "train": {"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 1},
                "log": {"progress": "lines"}, "device": "cpu"}
        for name, code in (("b", 1), ("a", 0)):
            c = json.loads(json.dumps(base))
            c["data"]["train"] = os.path.join(shards[name], "train_*.bin")
            c["output_dir"] = self.path(f"run_{name}")
            r = run(c, self.tmp, f"tok_{name}")
            print(f"[integrity] shards of tokenizer {name} on a model of tokenizer a: exit {r.returncode}")
            self.assertEqual(r.returncode, code, r.stderr[-2000:])
            e = subprocess.run([BIN, "eval", "--model", model, "--data", os.path.join(shards[name], "train_*.bin"),
                                "--seq-len", "16", "--device", "cpu"], capture_output=True, text=True)
            self.assertEqual(e.returncode, code, e.stderr[-2000:])
            if code:
                for err in (r.stderr, e.stderr):
                    self.assertIn("the shards were made with tokenizer gpt2-bpe:", err)
                    self.assertIn(tok_b, err)
                    self.assertIn("Tokenize the text with the model's tokenizer", err)
                self.assertFalse(os.path.exists(os.path.join(c["output_dir"], "final")))


if __name__ == "__main__":
    unittest.main()
