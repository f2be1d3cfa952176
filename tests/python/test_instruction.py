"""Instruction data end to end: prompt/completion .jsonl through `tokenize` into document
shards (read back here with numpy, independently of the C++ reader), the loss and the gradient
of packed pairs against transformers run on each pair alone (labels -100 on the prompt), the
same update for every split of the global batch and over two ranks, the combinations with
checkpointing, LoRA, bf16, out-of-memory back-off and resume, and bad input. Run by ctest
(`instruction.*`), which sets GPT2FT_BIN."""
import copy
import glob
import json
import os
import random
import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import train_reference as ref
from common import WorkDirTest, write_shard
from test_distributed import finish, free_port, start_ranks, write_config

BIN = os.environ.get("GPT2FT_BIN", "")
T = 64
WORDS = ("alpha beta gamma delta river stone cloud paper green quiet seven eleven north south apple window "
         "question answer simple bright").split()


def make_pairs(seed, n, max_prompt=6, max_completion=6):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "Q: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_prompt))) + "\nA:"
        completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_completion)))
        out.append({"prompt": prompt, "completion": completion})
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def train_tokenizer(out_dir, texts):
    """A byte-level BPE trained with HF `tokenizers` on the pairs' text (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    os.makedirs(out_dir, exist_ok=True)
    trainer.save_model(out_dir)
    from tokenizer_reference import hf_bpe
    return hf_bpe(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"))


def read_document_shard(path):
    """Our document (or preference) shard format, read with numpy: (tokens, document starts, target flags)."""
    with open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=np.int32, count=256)
    # a document shard (20261201, version 1 or 2), or a preference shard (20261206: the same layout)
    assert (header[0], header[1]) in ((20261201, 1), (20261201, 2), (20261206, 1)), f"{path}: magic/version {header[:2]}"
    n, width, docs = int(header[2]), int(header[3]), int(header[4])
    tokens = np.frombuffer(raw, dtype=np.uint16 if width == 2 else np.uint32, count=n, offset=1024)
    at = (1024 + n * width + 3) // 4 * 4
    starts = np.frombuffer(raw, dtype=np.uint32, count=docs, offset=at)
    bits = np.frombuffer(raw, dtype=np.uint8, offset=at + 4 * docs)
    assert len(raw) == at + 4 * docs + (n + 7) // 8, f"{path}: {len(raw)} bytes"
    return tokens, starts, np.unpackbits(bits, bitorder="little")[:n].astype(bool)


def run(*args, env=None):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def base_config(model_dir, train_glob):
    return {
        "model": {"init_from": model_dir, "dropout": 0.0},
        "data": {"train": train_glob, "seq_len": T, "shuffle": True, "num_workers": 2},
        "train": {"deterministic": True, "micro_batch_size": 8, "global_batch_size": 8, "max_steps": 4, "lr": 2e-3, "min_lr": 2e-4,
                  "warmup_steps": 1, "lr_schedule": "cosine", "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "grad_clip": 1.0, "fused_adamw": "off"},
        "log": {"every_steps": 1, "progress": "lines"},
        "device": "cpu",
    }


def train_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def weights_of(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def train_patched(test, cfg, name, patch=None, env=None, expect=0):
    """Trains `cfg` with `patch` ({section: {key: value}}) merged in and `env` added, under
    test.tmp/name, asserting the exit status; returns (output folder, completed process)."""
    cc = copy.deepcopy(cfg)
    for section, values in (patch or {}).items():
        cc.setdefault(section, {}).update(values)
    path, out = write_config(cc, test.tmp, name)
    r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **(env or {})))
    test.assertEqual(r.returncode, expect, r.stderr[-3000:])
    return out, r


def train_splits(test, cfg, cases):
    """Trains `cfg` (a global batch of 8) once per (micro batch, ranks, chunked loss) in `cases`;
    returns {name: (final weights, training rows)}, names like split_2x4_1ranks_chunked."""
    results = {}
    for micro, world, chunked in cases:
        cc = copy.deepcopy(cfg)
        cc["train"].update({"micro_batch_size": micro, "chunked_loss": chunked})
        name = f"split_{micro}x{8 // micro // world}_{world}ranks_{'chunked' if chunked else 'eager'}"
        if world == 1:
            ref.run_trainer(BIN, cc, test.tmp, name)
        else:
            cc["distributed"] = {"backend": "gloo"}
            path, _ = write_config(cc, test.tmp, name)
            for rank, (rc, err) in enumerate(finish(start_ranks(path, world, free_port()))):
                test.assertEqual(rc, 0, f"rank {rank}: {err[-3000:]}")
        out = os.path.join(test.tmp, name)
        results[name] = (weights_of(out), train_rows(out))
    return results


class InstructionTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.pairs = make_pairs(1, 90)
        texts = [p["prompt"] + p["completion"] for p in cls.pairs]
        cls.hf = train_tokenizer(os.path.join(cls.tmp, "tok"), texts)
        with open(os.path.join(cls.tmp, "tok", "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        cls.eot = vocab["<|endoftext|>"]
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"), vocab_size=len(vocab), n_positions=T)
        cls.jsonl = write_jsonl(os.path.join(cls.tmp, "pairs.jsonl"), cls.pairs)
        cls.shards = os.path.join(cls.tmp, "shards")
        r = run("tokenize", "--tokenizer", os.path.join(cls.tmp, "tok"), "--input", cls.jsonl, "--output-dir",
                cls.shards, "--prompt-field", "prompt", "--completion-field", "completion", "--val-fraction", "0",
                "--no-progress")
        assert r.returncode == 0, r.stderr
        cls.glob = os.path.join(cls.shards, "train_*.bin")

    def encode(self, pair):
        """[eot] + prompt + completion + [eot] and its labels (-100 on the eot and the prompt)."""
        p, c = self.hf.encode(pair["prompt"]).ids, self.hf.encode(pair["completion"]).ids
        ids = [self.eot] + p + c + [self.eot]
        return ids, [-100] * (1 + len(p)) + c + [self.eot]

    def reference_loss(self, model):
        """Each pair alone through transformers: the summed loss over the completion tokens and
        the closing eot, divided once by their total count."""
        total, count = 0.0, 0
        for pair in self.pairs:
            ids, labels = self.encode(pair)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total = total + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            count += int((target != -100).sum())
        return total / count, count

    def test_tokenize_writes_pairs_as_documents_with_their_targets(self):
        tokens, starts, targets = read_document_shard(os.path.join(self.shards, "train_000000.bin"))
        self.assertEqual(len(starts), len(self.pairs))
        ends = list(starts[1:]) + [len(tokens)]
        for i, (pair, s, e) in enumerate(zip(self.pairs, starts, ends)):
            ids, labels = self.encode(pair)
            self.assertEqual(tokens[s:e].tolist(), ids, f"pair {i}")
            self.assertEqual(targets[s:e].tolist(), [label != -100 for label in labels], f"pair {i}")
        with open(os.path.join(self.shards, "manifest.json")) as f:
            m = json.load(f)
        prompt_tokens = sum(len(self.hf.encode(p["prompt"]).ids) for p in self.pairs)
        target_tokens = sum(len(self.hf.encode(p["completion"]).ids) + 1 for p in self.pairs)
        self.assertEqual((m["kind"], m["pairs"]["train"], m["prompt_tokens"]["train"], m["target_tokens"]["train"]),
                         ("prompt_completion", len(self.pairs), prompt_tokens, target_tokens))
        self.assertEqual(int(targets.sum()), target_tokens)

        # A document never straddles two shards, however small they are.
        out = self.path("small_shards")
        r = run("tokenize", "--tokenizer", os.path.join(self.tmp, "tok"), "--input", self.jsonl, "--output-dir", out,
                "--prompt-field", "prompt", "--completion-field", "completion", "--val-fraction", "0",
                "--shard-tokens", "100", "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr)
        docs = []
        for path in sorted(glob.glob(os.path.join(out, "train_*.bin"))):
            tok, st, _ = read_document_shard(path)
            docs += [tok[s:e].tolist() for s, e in zip(st, list(st[1:]) + [len(tok)])]
        self.assertGreater(len(glob.glob(os.path.join(out, "train_*.bin"))), 5)
        self.assertEqual(docs, [self.encode(p)[0] for p in self.pairs])

    def test_malformed_lines_are_errors_naming_file_line_and_field_or_skipped_and_counted(self):
        good = json.dumps(self.pairs[0])
        cases = {
            "missing": ('{"prompt": "Q:"}', ["line_missing.jsonl:2", "completion field \"completion\""]),
            "number": ('{"prompt": 3, "completion": " a"}', ["line_number.jsonl:2", "prompt field \"prompt\"",
                                                            "number", "expected a string"]),
            "empty": ('{"prompt": "Q:", "completion": ""}', ["line_empty.jsonl:2", "is empty"]),
            "json": ('{"prompt": "Q:", ', ["line_json.jsonl:2", "not valid JSON"]),
            "array": ('["Q:", "A"]', ["line_array.jsonl:2", "not a JSON object"]),
        }
        for name, (line, fragments) in cases.items():
            with self.subTest(name):
                path = write_jsonl(self.path(f"line_{name}.jsonl"), [good, line, good])
                out = self.path(f"out_{name}")
                args = ["tokenize", "--tokenizer", os.path.join(self.tmp, "tok"), "--input", path, "--output-dir", out,
                        "--prompt-field", "prompt", "--completion-field", "completion", "--no-progress"]
                r = run(*args)
                self.assertEqual(r.returncode, 1, r.stderr)
                for f in fragments + ["--skip-bad-lines"]:
                    self.assertIn(f, r.stderr)
                self.assertNotIn("Traceback", r.stderr)
                self.assertFalse(glob.glob(os.path.join(out, "*.bin")), "nothing is written on an error")
                r = run(*args, "--skip-bad-lines", "--val-fraction", "0")
                self.assertEqual(r.returncode, 0, r.stderr)
                with open(os.path.join(out, "manifest.json")) as f:
                    m = json.load(f)
                self.assertEqual((m["skipped_lines"], m["pairs"]["train"]), (1, 2))
        r = run("tokenize", "--tokenizer", os.path.join(self.tmp, "tok"), "--input", self.jsonl, "--output-dir",
                self.path("one_field"), "--prompt-field", "prompt")
        self.assertEqual(r.returncode, 1)
        self.assertIn("go together", r.stderr)

    def test_loss_and_gradient_equal_transformers_on_each_pair_alone(self):
        reference = GPT2LMHeadModel.from_pretrained(self.model_dir).float()
        reference.eval()
        with torch.no_grad():
            ref_loss, ref_count = self.reference_loss(reference)
        # eval: packed several to a row, the loss over target tokens only.
        r = run("eval", "--model", self.model_dir, "--data", self.glob, "--seq-len", T, "--batch-size", 3, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        ours = json.loads(r.stdout.strip().splitlines()[-1])
        rows = ours["sequences"]
        print(f"[instruction] eval: {len(self.pairs)} pairs packed into {rows} rows of {T}; loss {ours['loss']:.7f} "
              f"vs transformers per pair {ref_loss.item():.7f} (rel {abs(ours['loss'] / ref_loss.item() - 1):.2g}); "
              f"{ours['target_tokens']} target tokens")
        self.assertLess(rows, len(self.pairs) / 2, "several pairs to a row")
        self.assertEqual(ours["target_tokens"], ref_count)
        self.assertLess(abs(ours["loss"] / ref_loss.item() - 1), 1e-5)

        # One training step over all rows. AdamW's first update is lr * g / (|g| + eps): with
        # lr 1, eps 1 and no decay it gives back every gradient element, g = u / (1 - |u|).
        # (The reference stays in eval mode: no dropout, as model.dropout 0 in ours.)
        loss, _ = self.reference_loss(reference)
        loss.backward()
        grads = {k: p.grad.detach() for k, p in reference.named_parameters()}
        c = base_config(self.model_dir, self.glob)
        c["train"].update({"micro_batch_size": rows, "global_batch_size": rows, "max_steps": 1, "lr": 1.0,
                           "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0, "eps": 1.0,
                           "grad_clip": 0.0, "betas": [0.9, 0.999]})
        for name, patch in (("chunked", {}), ("eager", {"chunked_loss": False})):
            cc = copy.deepcopy(c)
            cc["train"].update(patch)
            weights, metrics, _ = ref.run_trainer(BIN, cc, self.tmp, f"grad_{name}")
            before = load_file(os.path.join(self.model_dir, "model.safetensors"))
            worst = 0.0
            self.assertEqual(set(weights), set(grads))  # every trained tensor, as transformers names it
            for k, w in weights.items():
                u = before[k].double() - w.double()
                g = u / (1 - u.abs())
                g_ref = grads[k].double()
                # What float32 weights can say of g: w1 = w0 - u is rounded to half an ulp of w1.
                rounding = 0.5 * torch.finfo(torch.float32).eps * w.double().abs() / (1 - u.abs()) ** 2
                excess = ((g - g_ref).abs() - rounding).clamp_min(0).max() / g_ref.abs().max()
                worst = max(worst, excess.item())
            step_loss = [r["loss"] for r in metrics if "loss" in r][0]
            print(f"[instruction] one step ({name} loss): gradient max|diff| beyond float32 rounding / max|g| "
                  f"{worst:.3g} over every tensor; "
                  f"loss {step_loss:.7f} vs {loss.item():.7f}")
            self.assertLess(worst, 1e-5)
            self.assertLess(abs(step_loss / loss.item() - 1), 1e-5)

    def test_every_split_of_the_global_batch_and_two_ranks_give_the_same_update(self):
        c = base_config(self.model_dir, self.glob)
        results = train_splits(self, c, ((8, 1, True), (2, 1, True), (1, 1, True), (2, 1, False), (2, 2, True)))
        base_w, base_rows = results["split_8x1_1ranks_chunked"]
        for name, (w, rows) in results.items():
            diff = ref.max_weight_diff(w, base_w)
            metric = max(max(abs(a["loss"] / b["loss"] - 1), abs(a["grad_norm"] / b["grad_norm"] - 1))
                         for a, b in zip(rows, base_rows))
            print(f"[instruction] {name}: weights max|diff| vs 8x1 {diff:.3g}; loss / grad-norm max rel diff {metric:.3g}")
            self.assertEqual(len(rows), len(base_rows), name)
            self.assertLess(diff, 1e-5, name)
            self.assertLess(metric, 1e-5, name)

    def test_checkpointing_lora_bf16_back_off_and_resume_combine(self):
        c = base_config(self.model_dir, self.glob)
        c["train"].update({"micro_batch_size": 4, "max_steps": 6, "deterministic": True})  # a resume compared bitwise
        c["checkpoint"] = {"every_steps": 2}

        def go(name, patch=None, env=None, expect=0, cfg=None):
            return train_patched(self, cfg or c, name, patch, env, expect)

        def compare(label, out, base, tol):
            diff = ref.max_weight_diff(weights_of(out), weights_of(base))
            print(f"[instruction] {label}: max|diff| {diff:.3g}")
            self.assertLessEqual(diff, tol, label)

        straight, _ = go("straight")
        compare("checkpointing all vs none", go("ckpt", {"model": {"activation_checkpointing": "all"}})[0],
                straight, 1e-6)
        # Out of memory at micro batch 4 (the fault hook): back off to 2, same global batch.
        backed, r = go("oom", env={"GPT2FT_FAULT_OOM_ABOVE_MICRO": "2"})
        self.assertIn("OUT OF MEMORY", r.stderr)
        compare("out-of-memory back-off 4 -> 2", backed, straight, 1e-5)
        # A crash after step 3, then the same command: bitwise the straight run.
        crashed, _ = go("crash", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "3"}, expect=137)
        go("crash")
        compare("crash after step 3 and resume (bitwise)", crashed, straight, 0.0)
        # Resumed with half the micro batch: the same samples and normalisation.
        half, _ = go("half", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "3"}, expect=137)
        go("half", {"train": {"micro_batch_size": 2}})
        compare("resume with micro batch 2", half, straight, 1e-5)
        # bf16 autocast: the first step's loss within bf16 rounding, and it learns.
        bf16, _ = go("bf16", {"amp": {"dtype": "bfloat16"}})
        a, b = train_rows(bf16), train_rows(straight)
        print(f"[instruction] bf16: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}; fp32 {b[0]['loss']:.4f} -> "
              f"{b[-1]['loss']:.4f}")
        self.assertLess(abs(a[0]["loss"] - b[0]["loss"]), 0.05)
        self.assertLess(a[-1]["loss"], a[0]["loss"])
        self.assertNotEqual([r["loss"] for r in a], [r["loss"] for r in b])  # autocast really ran
        # LoRA: with and without checkpointing the same adapters; they train.
        lora = {"model": {"lora": {"rank": 4, "alpha": 8, "targets": ["c_attn", "c_fc"]}}, "train": {"lr": 1e-2}}
        outs = {}
        for ckpt in ("none", "all"):
            patch = copy.deepcopy(lora)
            patch["model"]["activation_checkpointing"] = ckpt
            outs[ckpt], _ = go(f"lora_{ckpt}", patch)
        adapters = [load_file(os.path.join(outs[k], "final", "adapter_model.safetensors")) for k in ("none", "all")]
        diff = max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0])
        rows = train_rows(outs["none"])
        print(f"[instruction] LoRA with/without checkpointing: adapters max|diff| {diff:.3g}; loss "
              f"{rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
        self.assertLess(diff, 1e-6)
        self.assertLess(rows[-1]["loss"], rows[0]["loss"])

    def test_damaged_shards_and_impossible_settings_are_clear_errors(self):
        with open(os.path.join(self.shards, "train_000000.bin"), "rb") as f:
            raw = f.read()
        folder = self.path("damaged")
        os.makedirs(folder, exist_ok=True)
        variants = {
            "bit": (raw[:-3] + bytes([raw[-3] ^ 0x04]) + raw[-2:], ["do not match the header's checksum", "damaged"]),
            "cut": (raw[:len(raw) - 9], ["truncated or corrupt"]),
        }
        for name, (content, fragments) in variants.items():
            with self.subTest(name):
                path = os.path.join(folder, f"{name}.bin")
                with open(path, "wb") as f:
                    f.write(content)
                for cmd in (["eval", "--model", self.model_dir, "--data", path, "--seq-len", T],):
                    r = run(*cmd)
                    self.assertEqual(r.returncode, 1, r.stderr)
                    for frag in fragments + [path]:
                        self.assertIn(frag, r.stderr)
                c = base_config(self.model_dir, path)
                cfg_path, out = write_config(c, self.tmp, f"damaged_{name}")
                r = subprocess.run([BIN, "--config", cfg_path], capture_output=True, text=True, timeout=600)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(path, r.stderr)
                self.assertNotIn("Exception raised from", r.stderr)
        # Documents longer than seq_len + 1 with data.too_long "error"; "documents" on plain text.
        c = base_config(self.model_dir, self.glob)
        c["data"].update({"seq_len": 8, "too_long": "error"})
        path, _ = write_config(c, self.tmp, "too_long")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("more than data.seq_len + 1 = 9", r.stderr)
        plain = self.path("plain", "train_000000.bin")
        write_shard(plain, list(range(50)) * 10)
        c = base_config(self.model_dir, plain)
        c["data"]["packing"] = "documents"
        path, _ = write_config(c, self.tmp, "plain_documents")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("needs document shards", r.stderr)


if __name__ == "__main__":
    import unittest
    unittest.main()
