"""`gpt2-finetune tokenize` end to end: shards read back with numpy hold every document's ids
(Hugging Face's encoding) after an end-of-text token, in input order; the split into train and
val, the manifest, worker-count independence, and bad input. Run by ctest (`tokenize`)."""
import glob
import json
import os
import random
import shutil
import subprocess
import unittest

import numpy as np

import tokenizer_reference as ref
from common import WorkDirTest

BIN = os.environ.get("GPT2FT_BIN", "")


def read_shard(path):
    """llm.c's shard format, read independently of the C++ reader."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] in (20240520, 20240801), f"{path}: magic {header[0]}"
    dtype = np.uint16 if header[0] == 20240520 else np.uint32
    tokens = np.fromfile(path, dtype=dtype, offset=1024)
    assert len(tokens) == header[2], f"{path}: {len(tokens)} tokens but the header says {header[2]}"
    return tokens


def read_split(out_dir, split):
    files = sorted(glob.glob(os.path.join(out_dir, f"{split}_*.bin")))
    return files, (np.concatenate([read_shard(f) for f in files]).tolist() if files else [])


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600)


class TokenizeTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tok_dir = os.path.join(cls.tmp, "tokenizer")
        cls.hf = ref.train_test_bpe(cls.tok_dir)
        with open(os.path.join(cls.tok_dir, "vocab.json"), encoding="utf-8") as f:
            cls.eot = json.load(f)["<|endoftext|>"]
        rng = random.Random(7)
        cls.docs = []
        for i in range(40):
            words = [rng.choice(ref.WORDS) for _ in range(rng.randint(0, 60))]
            cls.docs.append("".join(w + rng.choice([" ", " ", "\n", "  ", ", "]) for w in words))
        cls.docs[3] = ""  # an empty document still gets its separator

    def expected(self, docs):
        ids = []
        for d in docs:
            ids += [self.eot] + self.hf.encode(d).ids
        return ids

    def write_inputs(self):
        """Documents 0..9 as .txt files, 10..39 in one .jsonl."""
        inputs = []
        for i in range(10):
            p = self.path(f"doc{i:02d}.txt")
            with open(p, "w", encoding="utf-8", newline="") as f:
                f.write(self.docs[i])
            inputs.append(p)
        p = self.path("rest.jsonl")
        with open(p, "w", encoding="utf-8") as f:
            for d in self.docs[10:]:
                f.write(json.dumps({"id": 1, "body": d}) + "\n")
            f.write("\n")  # blank lines are skipped
        inputs.append(p)
        return inputs

    def test_shards_hold_the_documents_in_order_for_any_worker_count(self):
        inputs = self.write_inputs()
        outputs = []
        for workers in (1, 3):
            out = self.path(f"out{workers}")
            r = run("tokenize", "--tokenizer", self.tok_dir, "--input", *inputs, "--output-dir", out,
                    "--jsonl-field", "body", "--val-fraction", 0, "--shard-tokens", 200, "--workers", workers,
                    "--no-progress")
            self.assertEqual(r.returncode, 0, r.stderr)
            files, tokens = read_split(out, "train")
            self.assertGreater(len(files), 2, "expected several 200-token shards")
            self.assertEqual(read_split(out, "val")[0], [])
            self.assertEqual(tokens, self.expected(self.docs))
            with open(os.path.join(out, "manifest.json")) as f:
                manifest = json.load(f)
            self.assertEqual(manifest["documents"], {"train": 40, "val": 0})
            self.assertEqual(manifest["tokens"]["train"], len(tokens))
            self.assertEqual([s["file"] for s in manifest["shards"]["train"]], [os.path.basename(f) for f in files])
            self.assertEqual(manifest["tokenizer"]["eot_id"], self.eot)
            self.assertEqual(manifest["token_bytes"], 2)
            self.assertEqual([n for n in os.listdir(out) if n.startswith(".")], [], "temporary files left behind")
            outputs.append({os.path.basename(f): np.fromfile(f, dtype=np.uint8).tobytes() for f in files})
        self.assertEqual(outputs[0], outputs[1])

    def test_val_fraction_spreads_documents_evenly(self):
        inputs = self.write_inputs()
        out = self.path("out")
        r = run("tokenize", "--tokenizer", self.tok_dir, "--input", *inputs, "--output-dir", out,
                "--jsonl-field", "body", "--val-fraction", 0.25, "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr)
        val_docs = [d for i, d in enumerate(self.docs) if int((i + 1) * 0.25) > int(i * 0.25)]
        train_docs = [d for i, d in enumerate(self.docs) if not int((i + 1) * 0.25) > int(i * 0.25)]
        self.assertEqual(len(val_docs), 10)
        self.assertEqual(read_split(out, "val")[1], self.expected(val_docs))
        self.assertEqual(read_split(out, "train")[1], self.expected(train_docs))

    def test_long_documents_tokenize_as_a_whole(self):
        # Several MiB in one document: the reader cuts it into parts at safe places (before a
        # newline, or before a space in a line without newlines); the ids must not change.
        # Words include NBSP, em space and ideographic space, so whitespace runs end lines.
        rng = random.Random(9)
        words = [w for w in ref.WORDS if "\r" not in w]
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(40000)]
        multi_line = "\n".join(lines) + "\n"
        one_line = " ".join(lines).replace("\n", " ")
        for name, text in (("lines", multi_line), ("one_line", one_line)):
            with self.subTest(name=name):
                p = self.path(f"{name}.txt")
                with open(p, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
                self.assertGreater(os.path.getsize(p), 2 << 20)
                out = self.path(f"out_{name}")
                r = run("tokenize", "--tokenizer", self.tok_dir, "--input", p, "--output-dir", out,
                        "--val-fraction", 0, "--no-progress")
                self.assertEqual(r.returncode, 0, r.stderr)
                got = read_split(out, "train")[1]
                want = self.expected([text])
                self.assertEqual(len(got), len(want))
                self.assertEqual(got, want)

    def test_uint32_shards_for_large_vocabularies(self):
        # A vocabulary over 65,536 entries needs uint32 shards; pad the trained one with unused tokens.
        big = self.path("big_vocab")
        shutil.copytree(self.tok_dir, big)
        with open(os.path.join(big, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        n = len(vocab)
        for i in range(70000 - n):
            vocab[f"zzunused{i}"] = n + i
        with open(os.path.join(big, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        inputs = self.write_inputs()
        out = self.path("out")
        r = run("tokenize", "--tokenizer", big, "--input", *inputs, "--output-dir", out, "--jsonl-field", "body",
                "--val-fraction", 0, "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr)
        files, tokens = read_split(out, "train")
        self.assertEqual(np.fromfile(files[0], dtype=np.int32, count=2).tolist(), [20240801, 7])
        self.assertEqual(tokens, self.expected(self.docs))

    def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(self):
        good = self.path("good.txt")
        with open(good, "w") as f:
            f.write("hello world")
        bad_json = self.path("bad.jsonl")
        with open(bad_json, "w") as f:
            f.write('{"text": "ok"}\n{"text": broken\n')
        no_field = self.path("nofield.jsonl")
        with open(no_field, "w") as f:
            f.write('{"body": "x"}\n')
        empty_tok = self.path("empty_tokenizer", "x")
        occupied = self.path("occupied")
        self.assertEqual(run("tokenize", "--tokenizer", self.tok_dir, "--input", good, "--output-dir", occupied,
                             "--no-progress").returncode, 0)
        cases = [
            ("bad_json", [bad_json], self.tok_dir, [f"{bad_json}:2", "not valid JSON"]),
            ("missing_field", [no_field], self.tok_dir, [f"{no_field}:1", '"text"', "--jsonl-field"]),
            ("missing_input", [self.path("nope.txt")], self.tok_dir, ["nope.txt", "no such file"]),
            ("tokenizer_without_files", [good], os.path.dirname(empty_tok), ["empty_tokenizer", "vocab.json"]),
        ]
        for name, inputs, tok, fragments in cases:
            with self.subTest(case=name):
                out = self.path(f"out_{name}")
                r = run("tokenize", "--tokenizer", tok, "--input", *inputs, "--output-dir", out, "--no-progress")
                self.assertEqual(r.returncode, 1, r.stderr)
                for fragment in fragments:
                    self.assertIn(fragment, r.stderr)
                leftovers = os.listdir(out) if os.path.exists(out) else []
                self.assertEqual(leftovers, [], f"{name}: left {leftovers}")
        snapshot = lambda: {n: np.fromfile(os.path.join(occupied, n), dtype=np.uint8).tobytes()
                            for n in os.listdir(occupied)}
        before = snapshot()
        r = run("tokenize", "--tokenizer", self.tok_dir, "--input", good, "--output-dir", occupied, "--no-progress")
        self.assertEqual(r.returncode, 1)
        self.assertIn("--overwrite", r.stderr)
        self.assertEqual(before, snapshot())

    def test_many_batches_stream_through_the_pipeline_and_a_late_error_leaves_nothing(self):
        # ~12 MB of .jsonl lines: several batches in flight between the reading, tokenizing and
        # writing threads, and documents kept whole across many 50,000-token shards.
        rng = random.Random(11)
        words = [w for w in ref.WORDS if "\r" not in w]
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 400))) for _ in range(9000)]
        p = self.path("many.jsonl")
        with open(p, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        self.assertGreater(os.path.getsize(p), 10 << 20)
        want = [t for ids in zip(([self.eot] for _ in docs), (e.ids for e in self.hf.encode_batch(docs)))
                for part in ids for t in part]
        shards = []
        for workers in (1, 2):
            out = self.path(f"many_out{workers}")
            r = run("tokenize", "--tokenizer", self.tok_dir, "--input", p, "--output-dir", out, "--val-fraction", 0,
                    "--shard-tokens", 50000, "--workers", workers, "--no-progress")
            self.assertEqual(r.returncode, 0, r.stderr)
            files, got = read_split(out, "train")
            self.assertGreater(len(files), 20)
            self.assertEqual(len(got), len(want))
            self.assertEqual(got, want)
            shards.append([np.fromfile(f, dtype=np.uint8).tobytes() for f in files])
        self.assertEqual(shards[0], shards[1])
        # A bad last line: the reader fails while earlier batches are tokenized and written.
        with open(p, "a", encoding="utf-8") as f:
            f.write('{"text": unquoted}\n')
        out = self.path("many_bad")
        r = run("tokenize", "--tokenizer", self.tok_dir, "--input", p, "--output-dir", out, "--val-fraction", 0,
                "--shard-tokens", 50000, "--workers", 1, "--no-progress")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"{p}:{len(docs) + 1}", r.stderr)
        self.assertIn("not valid JSON", r.stderr)
        self.assertFalse(os.path.exists(out) and os.listdir(out), "a failed run left files behind")

    def test_tokenize_needs_no_libtorch_and_a_missing_command_library_is_named(self):
        # The executable runs tokenize itself; the other commands live in libgpt2ft_cli.so beside
        # it (which loads libtorch). Alone in a folder, tokenize still works and the rest say why not.
        alone = self.path("alone")
        os.makedirs(alone)
        exe = shutil.copy(BIN, alone)
        good = self.path("alone.txt")
        with open(good, "w") as f:
            f.write("hello world")
        r = subprocess.run([exe, "tokenize", "--tokenizer", self.tok_dir, "--input", good, "--output-dir",
                            self.path("alone_out"), "--val-fraction", "0", "--no-progress"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": self.path("ld")})
        self.assertEqual(r.returncode, 0, r.stderr)
        log_dir = os.path.dirname(self.path("ld"))
        loaded = "".join(open(os.path.join(log_dir, n), errors="replace").read()
                         for n in os.listdir(log_dir) if n.startswith("ld."))
        initialised = [line.split("calling init:")[1].strip() for line in loaded.splitlines() if "calling init:" in line]
        self.assertTrue(any("libc10" in lib for lib in initialised), initialised)  # the loader's log was read
        self.assertEqual([lib for lib in initialised if "libtorch" in lib], [], "tokenize loaded libtorch")
        self.assertEqual(read_split(self.path("alone_out"), "train")[1], self.expected(["hello world"]))
        for args in (["train", "--help"], ["--help"], []):
            with self.subTest(args=args):
                r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(os.path.join(alone, "libgpt2ft_cli.so"), r.stderr)
                self.assertIn("same folder", r.stderr)
                self.assertNotIn("terminate", r.stderr)


if __name__ == "__main__":
    unittest.main()
