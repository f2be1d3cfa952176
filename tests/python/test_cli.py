"""End-to-end tests of the gpt2-finetune command line against transformers.

Run by ctest (`cli`), which sets GPT2FT_BIN (the executable) and GPT2FT_GOLDEN_DIR (the
models make_golden.py wrote).
"""
import json
import os
import shutil
import struct
import subprocess
import unittest

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from common import WorkDirTest, reproducible_env, write_shard

BIN = os.environ.get("GPT2FT_BIN", "")
GOLDEN = os.environ.get("GPT2FT_GOLDEN_DIR", "")


def run(*args, env=None):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


class CliTest(WorkDirTest):
    required_env = ("GPT2FT_BIN", "GPT2FT_GOLDEN_DIR")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = os.path.join(GOLDEN, "tiny", "model")

    # --- eval -------------------------------------------------------------------------------

    def reference_eval(self, model_dir, shards, T, B, max_sequences=0):
        """Windows k = tokens[kT .. kT+T] per shard, tail dropped; mean loss over predictions, in
        float64 (a reference with no rounding of its own, whichever kernels this process gets)."""
        model = GPT2LMHeadModel.from_pretrained(model_dir).eval().double()
        windows = []
        for tokens in shards:
            for k in range((len(tokens) - 1) // T):
                windows.append(tokens[k * T: k * T + T + 1])
        if max_sequences:
            windows = windows[:max_sequences]
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(windows), B):
                batch = torch.tensor(np.stack(windows[i:i + B]), dtype=torch.long)
                logits = model(input_ids=batch[:, :-1]).logits
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(),
                                         batch[:, 1:].reshape(-1), reduction="sum").item()
                count += batch[:, 1:].numel()
        return total / count, count

    def test_eval_matches_transformers(self):
        rng = np.random.default_rng(5)
        shards = [rng.integers(0, 1000, size=n) for n in (203, 150, 16)]  # the last has no full window
        for i, tokens in enumerate(shards):
            write_shard(self.path(f"val_{i:06d}.bin"), tokens)
        pattern = self.path("val_*.bin")
        for T, B, max_sequences in ((16, 3, 0), (40, 2, 0), (16, 4, 7)):
            with self.subTest(T=T, B=B, max_sequences=max_sequences):
                r = run("eval", "--model", self.model, "--data", pattern, "--seq-len", T,
                        "--batch-size", B, "--max-sequences", max_sequences, "--device", "cpu", "--json",
                        env=reproducible_env())
                self.assertEqual(r.returncode, 0, r.stderr)
                got = json.loads(r.stdout.strip().splitlines()[-1])
                ref_loss, ref_tokens = self.reference_eval(self.model, shards, T, B, max_sequences)
                print(f"[eval] T={T} B={B} max_sequences={max_sequences}: loss {got['loss']:.7f} vs "
                      f"transformers {ref_loss:.7f}, tokens {got['tokens']} vs {ref_tokens}")
                self.assertEqual(got["tokens"], ref_tokens)
                self.assertLess(abs(got["loss"] - ref_loss) / ref_loss, 1e-6)
                self.assertAlmostEqual(got["perplexity"], float(np.exp(got["loss"])), places=6)

    def test_eval_backs_off_on_out_of_memory_with_the_same_loss(self):
        rng = np.random.default_rng(7)
        tokens = rng.integers(0, 1000, size=16 * 13 + 1)
        write_shard(self.path("val_000000.bin"), tokens)
        args = ("eval", "--model", self.model, "--data", self.path("val_*.bin"), "--seq-len", 16, "--batch-size", 6,
                "--device", "cpu", "--json")
        # Two processes compared to 1e-7: MKL's reproducible branch, as train.deterministic sets it.
        cbwr = reproducible_env()
        clean = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, **cbwr))
        self.assertEqual(clean.returncode, 0, clean.stderr)
        # Every forward pass over more than 2 windows fails as CUDA's allocator would.
        r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, GPT2FT_FAULT_OOM_ABOVE_MICRO="2", **cbwr))
        self.assertEqual(r.returncode, 0, r.stderr)
        warnings = [line for line in r.stderr.splitlines() if "OUT OF MEMORY during evaluation" in line]
        print("[eval oom] " + "\n[eval oom] ".join(warnings))
        self.assertEqual(len(warnings), 2)  # 6 -> 3 -> 1 windows per pass, once each
        self.assertIn("continuing with 3", warnings[0])
        self.assertIn("continuing with 1", warnings[1])
        got, want = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (r, clean))
        ref_loss, ref_tokens = self.reference_eval(self.model, [tokens], 16, 6)
        print(f"[eval oom] loss {got['loss']:.8f} vs {want['loss']:.8f} without the fault, transformers {ref_loss:.8f}")
        self.assertEqual(got["tokens"], ref_tokens)
        self.assertLess(abs(got["loss"] - want["loss"]) / want["loss"], 1e-7)
        self.assertLess(abs(got["loss"] - ref_loss) / ref_loss, 1e-6)

    def test_eval_never_holds_a_batchs_logits(self):
        # GPT-2's vocabulary with a tiny trunk: the logits of 16 x 256 tokens are 0.82 GB in
        # float32 (and cross-entropy's log-softmax as much again); the chunked loss holds ~64 MiB.
        torch.manual_seed(0)
        from transformers import GPT2Config
        folder = self.path("big_vocab")
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=256)).save_pretrained(
            folder, safe_serialization=True)
        rng = np.random.default_rng(8)
        write_shard(self.path("big_000000.bin"), rng.integers(0, 50257, size=16 * 256 + 1))

        def peak_rss_mb(batch):
            p = subprocess.Popen([BIN, "eval", "--model", folder, "--data", self.path("big_*.bin"), "--seq-len", "256",
                                  "--batch-size", str(batch), "--device", "cpu", "--json"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            err = p.stderr.read().decode()
            self.assertEqual(p.returncode, 0, err)
            return usage.ru_maxrss / 1024  # KiB on Linux

        one, sixteen = peak_rss_mb(1), peak_rss_mb(16)
        print(f"[eval memory] V=50257, T=256: peak RSS {one:.0f} MB at batch 1, {sixteen:.0f} MB at batch 16 "
              f"(+{sixteen - one:.0f} MB; the batch's float32 logits alone are 824 MB)")
        self.assertLess(sixteen - one, 300)

    def test_eval_reads_uint32_shards(self):
        rng = np.random.default_rng(6)
        tokens = rng.integers(0, 1000, size=100)
        write_shard(self.path("a.bin"), tokens, width=2)
        write_shard(self.path("b.bin"), tokens, width=4)
        # Two processes compared exactly: MKL's reproducible branch.
        outs = [json.loads(run("eval", "--model", self.model, "--data", self.path(f"{n}.bin"), "--seq-len", 16,
                               "--device", "cpu", "--json", env=reproducible_env()).stdout.strip().splitlines()[-1])
                for n in "ab"]
        self.assertEqual(outs[0], outs[1])

    # --- generate ---------------------------------------------------------------------------

    def test_greedy_generation_matches_transformers(self):
        for shape in ("tiny", "untied_gelu", "odd_heads"):
            with self.subTest(shape=shape):
                model_dir = os.path.join(GOLDEN, shape, "model")
                model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
                prompt = [5, 17, 42, 7, 99]
                n = 12
                with torch.no_grad():
                    ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         pad_token_id=0)[0, len(prompt):].tolist()
                r = run("generate", "--model", model_dir, "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", n, "--temperature", 0, "--device", "cpu", "--json")
                self.assertEqual(r.returncode, 0, r.stderr)
                got = json.loads(r.stdout.strip().splitlines()[-1])["ids"]
                print(f"[generate] {shape}: greedy {got} vs transformers {ref}")
                self.assertEqual(got, ref)

    def test_sampling_is_reproducible_for_a_seed(self):
        outs = {}
        for seed in (1, 1, 2):
            r = run("generate", "--model", self.model, "--prompt-ids", "1,2,3", "--max-new-tokens", 20,
                    "--temperature", 1.0, "--top-k", 50, "--top-p", 0.9, "--seed", seed, "--device", "cpu", "--json",
                    env=reproducible_env())  # one kernel for both processes: the same logits, bit for bit
            self.assertEqual(r.returncode, 0, r.stderr)
            outs.setdefault(seed, []).append(json.loads(r.stdout.strip().splitlines()[-1])["ids"])
        self.assertEqual(outs[1][0], outs[1][1])
        self.assertNotEqual(outs[1][0], outs[2][0])

    # --- init -------------------------------------------------------------------------------

    def test_init_writes_a_gpt2_initialised_model_transformers_loads(self):
        cfg = self.path("cfg.json")
        with open(cfg, "w") as f:
            json.dump({"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 3000, "n_positions": 128}, f)
        out = self.path("model")
        r = run("init", "--config-json", cfg, "--output", out, "--seed", 3)
        self.assertEqual(r.returncode, 0, r.stderr)
        model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        self.assertFalse(any(info.values()), info)
        # No tokenizer given and 3000 tokens: GPT-2's <|endoftext|> id 50256 does not exist here.
        self.assertEqual((model.config.bos_token_id, model.config.eos_token_id), (None, None))
        self.assertIn("bos_token_id/eos_token_id: none", r.stderr)
        params = dict(model.named_parameters())
        residual = 0.02 / (2 * 4) ** 0.5
        for name, p in params.items():
            if "ln_" in name:
                expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
                self.assertTrue(torch.equal(p, expected), name)
            elif name.endswith(".bias"):
                self.assertTrue(torch.equal(p, torch.zeros_like(p)), name)
            else:
                want = residual if name.endswith("c_proj.weight") else 0.02
                self.assertLess(abs(p.std().item() - want) / want, 0.1, name)
                self.assertLess(abs(p.mean().item()), want / 10, name)
        # The same seed gives the same bytes; another seed does not.
        again = self.path("again")
        run("init", "--config-json", cfg, "--output", again, "--seed", 3)
        other = self.path("other")
        run("init", "--config-json", cfg, "--output", other, "--seed", 4)
        def read(d):
            with open(os.path.join(d, "model.safetensors"), "rb") as f:
                return f.read()
        self.assertEqual(read(out), read(again))
        self.assertNotEqual(read(out), read(other))

    # --- bad input --------------------------------------------------------------------------

    def copy_model(self, name="model"):
        dst = self.path(name)
        shutil.copytree(self.model, dst)
        return dst

    def edit_config(self, model_dir, **changes):
        p = os.path.join(model_dir, "config.json")
        with open(p) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(p, "w") as f:
            json.dump(cfg, f)

    def edit_weights(self, model_dir, fn):
        p = os.path.join(model_dir, "model.safetensors")
        tensors = load_file(p)
        fn(tensors)
        save_file(tensors, p, metadata={"format": "pt"})

    def test_bad_input_gives_a_clear_error_and_a_plain_exit(self):
        rng = np.random.default_rng(1)
        good_shard = self.path("good.bin")
        write_shard(good_shard, rng.integers(0, 1000, size=300))
        st = lambda d: os.path.join(d, "model.safetensors")

        def missing_config():
            d = self.copy_model("no_config")
            os.remove(os.path.join(d, "config.json"))
            return d, ["config.json", "cannot open"]

        def missing_weights():
            d = self.copy_model("no_weights")
            os.remove(st(d))
            return d, ["no model.safetensors"]

        def truncated():
            d = self.copy_model("truncated")
            size = os.path.getsize(st(d))
            with open(st(d), "r+b") as f:
                f.truncate(size // 2)
            return d, [st(d), "outside the data section"]

        def offsets_out_of_range():
            d = self.copy_model("offsets")
            with open(st(d), "rb") as f:
                raw = f.read()
            n = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8:8 + n])
            header["transformer.ln_f.bias"]["data_offsets"][1] += 10 ** 9
            text = json.dumps(header).encode()
            text += b" " * ((8 - len(text) % 8) % 8)
            with open(st(d), "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
            return d, ["transformer.ln_f.bias", "data_offsets"]

        def wrong_dtype():
            d = self.copy_model("dtype")
            self.edit_weights(d, lambda t: t.__setitem__("transformer.ln_f.weight", t["transformer.ln_f.weight"].to(torch.int32)))
            return d, ["transformer.ln_f.weight", "floating dtype", "I32"]

        def wrong_shape():
            d = self.copy_model("shape")
            self.edit_weights(d, lambda t: t.__setitem__("transformer.wpe.weight", t["transformer.wpe.weight"][:10]))
            return d, ["transformer.wpe.weight", "expected shape [64, 64]", "found [10, 64]"]

        def missing_tensor():
            d = self.copy_model("missing")
            self.edit_weights(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
            return d, ["missing tensor", "transformer.h.1.mlp.c_fc.bias"]

        def unknown_activation():
            d = self.copy_model("activation")
            self.edit_config(d, activation_function="gelu_magic")
            return d, ["config.json", "activation_function", "gelu_magic"]

        def indivisible_heads():
            d = self.copy_model("heads")
            self.edit_config(d, n_head=5)
            return d, ["config.json", "n_embd (64) must be divisible by n_head (5)"]

        def garbled_config():
            d = self.copy_model("garbled")
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write("{ not json")
            return d, ["config.json", "not valid JSON"]

        def rewrite_header(d, edit_header=None, shift=0, trailing=b""):
            """model.safetensors with its header edited, its length off by `shift`, bytes appended."""
            with open(st(d), "rb") as f:
                raw = f.read()
            n = struct.unpack("<Q", raw[:8])[0]
            header = raw[8:8 + n]
            if edit_header:
                header = edit_header(header)
            with open(st(d), "wb") as f:
                f.write(struct.pack("<Q", len(header) + shift) + header + raw[8 + n:] + trailing)

        def header_one_byte_short():  # every tensor would read shifted by a byte
            d = self.copy_model("short_header")
            rewrite_header(d, lambda h: h + b" ", shift=-1)
            return d, [st(d), "the tensors end at byte", "corrupt file"]

        def trailing_bytes():
            d = self.copy_model("trailing")
            rewrite_header(d, trailing=b"\0" * 16)
            return d, [st(d), "bytes after the data"]

        def gap_between_tensors():
            d = self.copy_model("gap")
            def edit(h):
                header = json.loads(h)
                header["transformer.ln_f.bias"]["data_offsets"][0] -= 4  # overlaps its neighbour
                return json.dumps(header).encode()
            rewrite_header(d, edit)
            return d, [st(d), "transformer.ln_f.bias"]

        def huge_size(key, value):
            def make():
                d = self.copy_model(f"huge_{key}")
                self.edit_config(d, **{key: value})
                return d, ["config.json", key, "expected an integer in [1, "]
            make.__name__ = f"huge_{key}"
            return make

        def deep_config():
            d = self.copy_model("deep")
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write('{"n_layer": 2, "junk": ' + "[" * 100000 + "]" * 100000 + "}")
            return d, ["config.json", "nested deeper than 64"]

        def config_bigger_than_weights():  # shapes checked against the header before building
            d = self.copy_model("bigger")
            self.edit_config(d, n_embd=2048, n_head=4)
            return d, [st(d), "expected shape", "from config.json"]

        model_cases = [missing_config, missing_weights, truncated, offsets_out_of_range, wrong_dtype,
                       wrong_shape, missing_tensor, unknown_activation, indivisible_heads, garbled_config,
                       header_one_byte_short, trailing_bytes, gap_between_tensors, huge_size("n_embd", 2 ** 40),
                       huge_size("vocab_size", 10 ** 12), huge_size("n_inner", 2 ** 40),
                       huge_size("n_positions", 2 ** 31), huge_size("n_layer", 10 ** 9), deep_config,
                       config_bigger_than_weights]
        cases = []
        for make in model_cases:
            d, fragments = make()
            cases.append((make.__name__, ["eval", "--model", d, "--data", good_shard, "--seq-len", 16,
                                          "--device", "cpu"], fragments))

        bad_magic = self.path("bad_magic.bin")
        with open(bad_magic, "wb") as f:
            f.write(b"\x00" * 2048)
        short = self.path("short.bin")
        write_shard(short, rng.integers(0, 1000, size=100))
        with open(short, "r+b") as f:
            f.truncate(1024 + 150)
        big_ids = self.path("big_ids.bin")
        write_shard(big_ids, [5] * 40 + [1000] + [5] * 40)
        eval_args = lambda data, *extra: ["eval", "--model", self.model, "--data", data, "--device", "cpu", *extra]
        cases += [
            ("missing_folder", eval_args(good_shard)[:2] + [self.path("nope")] + eval_args(good_shard)[3:],
             ["nope", "not a directory"]),
            ("seq_len_beyond_positions", eval_args(good_shard, "--seq-len", 65), ["--seq-len 65", "n_positions (64)"]),
            ("shard_bad_magic", eval_args(bad_magic, "--seq-len", 16), [bad_magic, "bad magic"]),
            ("shard_truncated", eval_args(short, "--seq-len", 16), [short, "header says 100 tokens"]),
            ("token_out_of_vocab", eval_args(big_ids, "--seq-len", 16), [big_ids, "token id 1000", "vocabulary of 1000"]),
            ("glob_matches_nothing", eval_args(self.path("none_*.bin"), "--seq-len", 16), ["--data", "matches no file"]),
            ("bad_device", ["eval", "--model", self.model, "--data", good_shard, "--device", "tpu"],
             ["--device", "\"tpu\""]),
            ("unknown_preset", ["init", "--preset", "gpt5", "--output", self.path("x")], ["gpt5", "distilgpt2"]),
            ("init_bad_config_json", ["init", "--config-json", self.path("nope.json"), "--output", self.path("y")],
             ["nope.json"]),
        ]
        # Tokenizer files: ids out of range and fields of the wrong type name the file.
        text = self.path("text.txt")
        with open(text, "w") as f:
            f.write("hello world\n")

        def tokenizer_folder(name, files):
            d = self.path(name)
            os.makedirs(d, exist_ok=True)
            for file, content in files.items():
                with open(os.path.join(d, file), "w") as f:
                    f.write(content)
            return ["tokenize", "--tokenizer", d, "--input", text, "--output-dir", self.path(name + "_out")]

        merges = "#version: 0.2\n"
        cases += [
            ("vocab_id_beyond_uint32", tokenizer_folder("tok_id", {"vocab.json": json.dumps({"a": 2 ** 32}),
                                                                   "merges.txt": merges}),
             ["vocab.json", "the id of token \"a\" is 4294967296"]),
            ("vocab_id_huge_table", tokenizer_folder("tok_big", {"vocab.json": json.dumps({"a": 2 ** 31}),
                                                                 "merges.txt": merges}),
             ["vocab.json", "expected an integer in [0, 16777216)"]),
            ("tokenizer_json_wrong_types", tokenizer_folder("tok_json", {"tokenizer.json": json.dumps(
                {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [[1, 2]]}})}),
             ["tokenizer.json", "model.merges: expected \"A B\" strings or [A, B] pairs"]),
        ]
        for name, args, fragments in cases:
            with self.subTest(case=name):
                r = run(*args)
                self.assertEqual(r.returncode, 1, f"{name}: exit {r.returncode}\n{r.stderr}")
                lines = [line for line in r.stderr.strip().splitlines() if line]
                self.assertEqual(len(lines), 1, f"{name}: expected one error line, got:\n{r.stderr}")
                self.assertTrue(lines[0].startswith("gpt2-finetune: error: "), lines[0])
                for fragment in fragments:
                    self.assertIn(fragment, lines[0], name)
                print(f"[bad input] {name}: {lines[0]}")

    def test_readme_documents_every_config_option(self):
        r = run("train", "--help")
        self.assertEqual(r.returncode, 0)
        options = [line.split()[0] for line in r.stdout.split("Config options (JSON paths):")[1].splitlines()
                   if line.startswith("  ") and not line.startswith("      ")]
        self.assertGreater(len(options), 30)
        readme_path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")
        with open(readme_path) as f:
            readme = f.read()
        missing = [o for o in options if f"`{o}`" not in readme]
        self.assertEqual(missing, [], "options missing from README.md")

    def test_usage_errors_exit_2_and_help_exits_0(self):
        r = run("eval", "--data", "x")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--model", r.stderr)
        for sub in ([], ["init"], ["eval"], ["tokenize"], ["train"], ["generate"]):
            r = run(*sub, "--help")
            self.assertEqual(r.returncode, 0)
            self.assertIn("Usage", r.stdout)
        r = run("--version")
        self.assertEqual(r.returncode, 0)
        self.assertIn("gpt2-finetune", r.stdout)


if __name__ == "__main__":
    unittest.main()
