"""Preference training (DPO) end to end: prompt/chosen/rejected .jsonl through `tokenize` into
preference shards (read back with numpy), each loss type's gradient and validation loss against
the formulas of TRL's DPOTrainer (make_dpo_golden.trl_dpo_loss) on transformers' log-probs, the
three references, every split of the global batch and two ranks, the combinations with LoRA,
checkpointing, bf16, back-off and resume, bad input, and a run on real text. Run by ctest
(`dpo.*`), which sets GPT2FT_BIN."""
import glob
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

import train_reference as ref
from common import WorkDirTest
from make_dpo_golden import trl_dpo_loss
from test_distributed import write_config
from test_instruction import WORDS, make_pairs, run, train_patched, train_splits, train_tokenizer, write_jsonl

BIN = os.environ.get("GPT2FT_BIN", "")
T = 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("GPT2FT_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared"))


def make_preferences(seed, n):
    """Prompt, a chosen continuation and a different rejected one of random words."""
    rng = random.Random(seed)
    rows = []
    for p in make_pairs(seed, n):
        words = p["completion"].split()
        rejected = " " + " ".join(rng.choice(WORDS) for _ in range(len(words) + rng.randint(0, 2)))
        rows.append({"prompt": p["prompt"], "chosen": p["completion"],
                     "rejected": rejected if rejected != p["completion"] else rejected + " seven"})
    return rows


def read_preference_shard(path):
    """Our preference shard, read with numpy: (tokens, document starts, target flags)."""
    with open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=np.int32, count=256)
    assert header[0] == 20261206 and header[1] == 1, f"{path}: magic/version {header[:2]}"
    n, width, docs = int(header[2]), int(header[3]), int(header[4])
    tokens = np.frombuffer(raw, dtype=np.uint16 if width == 2 else np.uint32, count=n, offset=1024)
    at = (1024 + n * width + 3) // 4 * 4
    starts = np.frombuffer(raw, dtype=np.uint32, count=docs, offset=at)
    bits = np.frombuffer(raw, dtype=np.uint8, offset=at + 4 * docs)
    return tokens, starts, np.unpackbits(bits, bitorder="little")[:n].astype(bool)


def metrics_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_rows(out):
    return [r for r in metrics_of(out) if "loss" in r]


def val_rows(out):
    return [r for r in metrics_of(out) if "val_loss" in r]


class DpoTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.rows = make_preferences(7, 64)
        cls.val_rows = make_preferences(8, 16)
        texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in cls.rows + cls.val_rows]
        cls.hf = train_tokenizer(os.path.join(cls.tmp, "tok"), texts)
        with open(os.path.join(cls.tmp, "tok", "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        cls.eot = vocab["<|endoftext|>"]
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"), vocab_size=len(vocab), n_positions=T)
        cls.train_glob = cls.tokenize("train", cls.rows)
        cls.val_glob = cls.tokenize("val", cls.val_rows)

    @classmethod
    def tokenize(cls, name, rows, *extra):
        out = os.path.join(cls.tmp, f"shards_{name}")
        r = run("tokenize", "--tokenizer", os.path.join(cls.tmp, "tok"), "--input",
                write_jsonl(os.path.join(cls.tmp, f"{name}.jsonl"), rows), "--output-dir", out, "--prompt-field",
                "prompt", "--chosen-field", "chosen", "--rejected-field", "rejected", "--val-fraction", "0",
                "--no-progress", *extra)
        assert r.returncode == 0, r.stderr
        return os.path.join(out, "train_*.bin")

    def config(self, **train):
        c = {"model": {"init_from": self.model_dir},
             "data": {"train": self.train_glob, "val": self.val_glob, "seq_len": T, "num_workers": 2},
             "train": {"objective": "dpo", "deterministic": True, "micro_batch_size": 8, "global_batch_size": 8,
                       "max_steps": 4, "lr": 3e-3, "warmup_steps": 0, "lr_schedule": "constant",
                       "weight_decay": 0.0, "grad_clip": 0.0, "fused_adamw": "off"},
             "eval": {"every_steps": 0},
             "log": {"every_steps": 1, "progress": "lines"},
             "device": "cpu"}
        c["train"].update(train)
        return c

    def sides(self, row):
        """Both sides as [eot] + prompt + continuation + [eot] with labels -100 on eot and prompt."""
        prompt = [self.eot] + self.hf.encode(row["prompt"]).ids
        out = []
        for key in ("chosen", "rejected"):
            ids = prompt + self.hf.encode(row[key]).ids + [self.eot]
            out.append((ids, [-100] * len(prompt) + ids[len(prompt):]))
        return out

    def logps(self, model, rows):
        """(n, 2) summed log-probs of each side's targets and (n, 2) target counts, in float64."""
        sums, counts = [], []
        for row in rows:
            for ids, labels in self.sides(row):
                logits = model(torch.tensor([ids])).logits[0, :-1].double()
                lab = torch.tensor(labels[1:])
                keep = lab != -100
                sums.append(torch.log_softmax(logits[keep], -1).gather(1, lab[keep, None]).sum())
                counts.append(keep.sum())
        return torch.stack(sums).view(-1, 2), torch.stack(counts).view(-1, 2).double()

    def reference_loss(self, policy, reference, rows, loss_type, beta, smoothing):
        pol, counts = self.logps(policy, rows)
        with torch.no_grad():
            refl, _ = self.logps(reference, rows)
        if loss_type == "ipo":
            pol, refl = pol / counts, refl / counts
        losses, chosen, rejected = trl_dpo_loss(pol[:, 0], pol[:, 1], refl[:, 0], refl[:, 1], loss_type, beta,
                                                smoothing)
        return losses.mean(), (chosen > rejected).double().mean()

    def test_tokenize_writes_preference_shards_and_cuts_prompts_first(self):
        tokens, starts, targets = read_preference_shard(glob.glob(self.train_glob)[0])
        self.assertEqual(len(starts), 2 * len(self.rows))
        ends = list(starts[1:]) + [len(tokens)]
        for k, row in enumerate(self.rows):
            for side, (ids, labels) in enumerate(self.sides(row)):
                d = 2 * k + side
                self.assertEqual(tokens[starts[d]:ends[d]].tolist(), ids, f"example {k} side {side}")
                self.assertEqual(targets[starts[d]:ends[d]].tolist(), [lab != -100 for lab in labels])
        with open(os.path.join(os.path.dirname(self.train_glob), "manifest.json")) as f:
            m = json.load(f)
        self.assertEqual((m["kind"], m["examples"]["train"]), ("preference", len(self.rows)))
        self.assertEqual(m["documents"]["train"], len(starts))  # two documents an example, as the shard holds
        # --max-length: the prompt's beginning goes first (its last token stays), then the continuations' ends.
        long_row = {"prompt": "Q: " + " ".join(WORDS) + "\nA:", "chosen": " alpha beta", "rejected": " gamma"}
        (c_ids, c_lab), (r_ids, _) = self.sides(long_row)
        limit = len(c_ids) - 5
        g = self.tokenize("cut", [long_row, self.rows[0]], "--max-length", str(limit))
        tokens, starts, targets = read_preference_shard(glob.glob(g)[0])
        self.assertEqual(tokens[starts[0]:starts[1]].tolist(), c_ids[5:])
        self.assertEqual(tokens[starts[1]:starts[2]].tolist(), r_ids[5:])
        with open(os.path.join(os.path.dirname(g), "manifest.json")) as f:
            self.assertEqual(json.load(f)["truncated"]["train"], 1)
        tiny = self.tokenize("cut_tiny", [long_row], "--max-length", "3")
        tokens, starts, targets = read_preference_shard(glob.glob(tiny)[0])
        self.assertEqual(tokens[:3].tolist(), c_ids[len(c_ids) - len(c_lab) + c_lab.count(-100) - 1:][:3])
        self.assertEqual(targets[:3].tolist(), [False, True, True])
        print(f"[dpo] shards: {len(self.rows)} examples read back exactly; --max-length {limit} cut 5 prompt tokens")

    def test_loss_gradient_and_validation_equal_trl_formulas_per_loss_type(self):
        init = GPT2LMHeadModel.from_pretrained(self.model_dir).float().eval()
        for loss_type, beta, smoothing in (("sigmoid", 0.1, 0.1), ("ipo", 0.1, 0.0), ("hinge", 0.5, 0.0)):
            dpo = {"beta": beta, "loss": loss_type, "label_smoothing": smoothing}
            # One step over every example: AdamW at lr 1, eps 1 gives the gradient back (g = u / (1 - |u|)).
            policy = GPT2LMHeadModel.from_pretrained(self.model_dir).float().eval()
            loss, _ = self.reference_loss(policy, init, self.rows, loss_type, beta, smoothing)
            loss.backward()
            grads = {k: p.grad.detach().double() for k, p in policy.named_parameters()}
            c = self.config(micro_batch_size=16, global_batch_size=len(self.rows), max_steps=1, lr=1.0, eps=1.0,
                            betas=[0.9, 0.999])
            c["dpo"] = dpo
            weights, metrics, _ = ref.run_trainer(BIN, c, self.tmp, f"grad_{loss_type}")
            before = load_file(os.path.join(self.model_dir, "model.safetensors"))
            worst = 0.0
            for k, w in weights.items():
                u = before[k].double() - w.double()
                g = u / (1 - u.abs())
                rounding = 0.5 * torch.finfo(torch.float32).eps * w.double().abs() / (1 - u.abs()) ** 2
                worst = max(worst, (((g - grads[k]).abs() - rounding).clamp_min(0).max() /
                                    grads[k].abs().max()).item())
            step_loss = [r["loss"] for r in metrics if "loss" in r][0]
            # A few steps, then validation: the trained policy against the initial model as reference.
            c = self.config()
            c["dpo"] = dpo
            out = os.path.join(self.tmp, f"val_{loss_type}")
            ref.run_trainer(BIN, c, self.tmp, f"val_{loss_type}")
            val = val_rows(out)[-1]
            trained = GPT2LMHeadModel.from_pretrained(os.path.join(out, "final")).float().eval()
            with torch.no_grad():
                val_loss, accuracy = self.reference_loss(trained, init, self.val_rows, loss_type, beta, smoothing)
            print(f"[dpo] {loss_type} (beta {beta}, smoothing {smoothing}): step loss {step_loss:.7f} vs "
                  f"{loss.item():.7f}; gradient beyond float32 rounding / max|g| {worst:.3g}; val loss after 4 steps "
                  f"{val['val_loss']:.7f} vs {val_loss.item():.7f} (rel {abs(val['val_loss'] / val_loss.item() - 1):.2g}),"
                  f" accuracy {val['val_rewards/accuracies']:.4f} vs {accuracy.item():.4f}")
            self.assertLess(abs(step_loss / loss.item() - 1), 1e-5)
            self.assertLess(worst, 1e-5)
            self.assertLess(abs(val["val_loss"] / val_loss.item() - 1), 1e-5)
            self.assertAlmostEqual(val["val_rewards/accuracies"], accuracy.item(), places=6)
            self.assertNotAlmostEqual(val["val_loss"], metrics[0]["loss"] if "loss" in metrics[0] else 0, places=4)

    def test_the_three_references_give_the_same_losses(self):
        lora = {"rank": 4, "alpha": 8, "targets": ["c_attn", "c_fc"]}
        for label, model_patch, kinds in (("full", {}, ("precomputed", "model")),
                                          ("lora", {"lora": lora}, ("precomputed", "base", "model"))):
            losses = {}
            for kind in kinds:
                c = self.config(lr=1e-2)
                c["model"].update(model_patch)
                c["dpo"] = {"reference": kind}
                c["eval"] = {"every_steps": 2}
                path, out = write_config(c, self.tmp, f"ref_{label}_{kind}")
                r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
                self.assertEqual(r.returncode, 0, r.stderr[-3000:])
                losses[kind] = [r["loss"] for r in train_rows(out)] + [r["val_loss"] for r in val_rows(out)]
            first = losses[kinds[0]]
            worst = max(abs(a / b - 1) for k in kinds for a, b in zip(losses[k], first))
            print(f"[dpo] {label}: references {', '.join(kinds)} give losses {['%.6f' % x for x in first]}; "
                  f"worst relative difference {worst:.2g}")
            self.assertLess(worst, 1e-5)
            self.assertNotEqual(first[0], first[-1])  # it trained

    def test_a_replaced_val_set_or_a_short_table_is_scored_again_on_resume(self):
        """The precomputed table is reused only for the data it was made from: data.val replaced
        between a crash and the resume (same path, same count, other pairs), or a table whose
        rows do not match the data, is scored again; the resumed run then validates as a run
        that had the new data.val from the start."""
        val_dir = os.path.join(self.tmp, "swapped_val")
        other = self.tokenize("val_other", make_preferences(9, 16))

        def use(pattern):
            shutil.rmtree(val_dir, ignore_errors=True)
            shutil.copytree(os.path.dirname(pattern), val_dir)

        c = self.config(max_steps=4)
        c["data"]["val"] = os.path.join(val_dir, "train_*.bin")
        c["eval"] = {"every_steps": 2}
        c["checkpoint"] = {"every_steps": 2}
        c["dpo"] = {"reference": "precomputed"}
        straight = {}  # runs on each data.val from the start
        for label, pattern in (("replaced", other), ("short", self.val_glob)):
            use(pattern)
            straight[label], _ = train_patched(self, c, "swap_straight_" + label)
        for label in ("replaced", "short"):
            use(self.val_glob)
            name = "swap_" + label
            out, _ = train_patched(self, c, name, env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "3"}, expect=137)
            table = os.path.join(out, "reference_logps.safetensors")
            if label == "replaced":
                use(other)  # same path and count, other pairs
                expect = "was made for another run or data; scoring again"
            else:  # the key matches, but the table lost rows
                with safe_open(table, "pt") as f:
                    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
                tensors["val"] = tensors["val"][:8].clone()
                save_file(tensors, table, metadata=meta)
                expect = "holds 64 training and 8 validation examples, the data 64 and 16; scoring again"
            _, r = train_patched(self, c, name)
            self.assertIn(expect, r.stderr)
            got, want = val_rows(out)[-1], val_rows(straight[label])[-1]
            print(f"[dpo] {label} table: resumed val loss {got['val_loss']:.6f}, a run on that data.val from the "
                  f"start {want['val_loss']:.6f}")
            self.assertEqual(got["step"], want["step"])
            self.assertLess(abs(got["val_loss"] - want["val_loss"]), 1e-6)
            self.assertLess(abs(got["val_rewards/margins"] - want["val_rewards/margins"]), 1e-6)

    def test_the_model_reference_computes_as_the_policy_under_bf16(self):
        """Under bf16 autocast the "model" copy must compute as the initial policy does (16-bit
        matmuls, a float32 residual stream): at the first step the loss is log 2 and the rewards 0."""
        c = self.config(max_steps=1)
        c["amp"] = {"dtype": "bfloat16"}
        for kind in ("model", "precomputed"):
            c["dpo"] = {"reference": kind}
            out, _ = train_patched(self, c, "bf16_step0_" + kind)
            row = train_rows(out)[0]
            print(f"[dpo] bf16, reference {kind}: step-1 loss {row['loss']:.6f} (log 2 = {np.log(2):.6f}), rewards "
                  f"chosen {row['rewards/chosen']:.2g}, rejected {row['rewards/rejected']:.2g}")
            # The same kernels on the same values: equal to float32's last bits, not merely close
            # (a copy with 16-bit LayerNorms and embeddings was off by 4e-5 in the rewards here,
            # 1.7e-5 in the loss, more on deeper models).
            self.assertLess(abs(row["loss"] - np.log(2)), 1e-6, kind)
            self.assertLess(abs(row["rewards/chosen"]), 1e-6, kind)
            self.assertLess(abs(row["rewards/rejected"]), 1e-6, kind)
        # The metrics plot of a DPO run adds its rewards and accuracies (a third row of panels).
        import matplotlib.image
        png = os.path.join(self.tmp, "dpo_metrics.png")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"),
                            os.path.join(out, "metrics.jsonl"), "-o", png], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertEqual(matplotlib.image.imread(png).shape[0], 1050)  # 3 rows of panels, 100 dpi

    def test_eval_of_preference_shards_equals_trl_formulas(self):
        """`eval` on preference shards: the DPO loss, reward accuracy, margin and log-probs of a
        trained model against its initial one (--reference), as TRL's formulas give them on
        transformers' log-probs; without a reference (and no adapter) a clear error."""
        c = self.config()
        c["data"]["val"] = ""
        ref.run_trainer(BIN, c, self.tmp, "eval_pairs")
        final = os.path.join(self.tmp, "eval_pairs", "final")
        r = run("eval", "--model", final, "--data", self.val_glob, "--reference", self.model_dir, "--seq-len", T,
                "--json")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        got = json.loads(r.stdout.strip().splitlines()[-1])
        init = GPT2LMHeadModel.from_pretrained(self.model_dir).float().eval()
        trained = GPT2LMHeadModel.from_pretrained(final).float().eval()
        with torch.no_grad():
            pol, _ = self.logps(trained, self.val_rows)
            refl, _ = self.logps(init, self.val_rows)
        losses, chosen, rejected = trl_dpo_loss(pol[:, 0], pol[:, 1], refl[:, 0], refl[:, 1], "sigmoid", 0.1, 0.0)
        want = {"dpo_loss": losses.mean().item(), "rewards/accuracies": (chosen > rejected).double().mean().item(),
                "rewards/margins": (chosen - rejected).mean().item(), "rewards/chosen": chosen.mean().item(),
                "logps/chosen": pol[:, 0].mean().item(), "logps/rejected": pol[:, 1].mean().item()}
        print(f"[dpo] eval of {got['pairs']} pairs: " +
              ", ".join(f"{k} {got[k]:.6f} (transformers + TRL {v:.6f})" for k, v in want.items()))
        self.assertEqual(got["pairs"], len(self.val_rows))
        for k, v in want.items():
            self.assertLess(abs(got[k] - v), 1e-4 * max(1.0, abs(v)), k)
        r = run("eval", "--model", final, "--data", self.val_glob, "--seq-len", T)
        self.assertEqual(r.returncode, 1)
        self.assertIn("--reference", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_every_split_of_the_global_batch_and_two_ranks_give_the_same_update(self):
        # eps 1: AdamW's update is then about lr * m, so the weights show the gradients' differences
        # instead of sqrt(v) blowing up the rounding of near-zero gradients to a whole step.
        c = self.config(lr=0.5, eps=1.0)
        results = train_splits(self, c, ((8, 1, True), (2, 1, True), (1, 1, True), (2, 2, True), (2, 1, False)))
        base_w, base_rows = results["split_8x1_1ranks_chunked"]
        for name, (w, rows) in results.items():
            diff = ref.max_weight_diff(w, base_w)
            loss = max(abs(a["loss"] / b["loss"] - 1) for a, b in zip(rows, base_rows))
            acc = max(abs(a["rewards/accuracies"] - b["rewards/accuracies"]) for a, b in zip(rows, base_rows))
            norm = max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(rows, base_rows))
            print(f"[dpo] {name}: weights max|diff| {diff:.3g}; losses rel {loss:.2g}; gradient norms rel {norm:.2g}; "
                  f"accuracies {acc:.2g}")
            self.assertLess(norm, 1e-5)
            self.assertLess(diff, 1e-5)
            self.assertLess(loss, 1e-5)
            self.assertEqual(acc, 0.0)

    def test_lora_checkpointing_bf16_fp16_back_off_and_resume_combine(self):
        c = self.config(micro_batch_size=4, max_steps=6, lr=1e-2)
        c["model"]["lora"] = {"rank": 4, "alpha": 8, "targets": ["c_attn", "c_fc"]}
        c["dpo"] = {"reference": "base"}
        c["checkpoint"] = {"every_steps": 2}

        def go(name, patch=None, env=None, expect=0):
            return train_patched(self, c, name, patch, env, expect)

        def adapter(out):
            return load_file(os.path.join(out, "final", "adapter_model.safetensors"))

        def compare(label, out, base, tol):
            a, b = adapter(out), adapter(base)
            diff = max((a[k] - b[k]).abs().max().item() for k in a)
            print(f"[dpo] LoRA {label}: adapter max|diff| {diff:.3g}")
            self.assertLessEqual(diff, tol, label)

        straight, _ = go("combo_straight")
        compare("checkpointing all vs none", go("combo_ckpt", {"model": {"activation_checkpointing": "all"}})[0],
                straight, 1e-6)
        backed, r = go("combo_oom", env={"GPT2FT_FAULT_OOM_ABOVE_MICRO": "2"})
        self.assertIn("with micro batch 4 (", r.stderr)
        self.assertIn("backing off to micro batch 2 x accumulation 4", r.stderr)  # 8 pairs: 2 x 4
        compare("out-of-memory back-off 4 -> 2", backed, straight, 1e-5)
        crashed, _ = go("combo_crash", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "3"}, expect=137)
        go("combo_crash", {"train": {"micro_batch_size": 2}})
        compare("crash after step 3, resumed at micro batch 2", crashed, straight, 1e-5)
        same, _ = go("combo_same", env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "3"}, expect=137)
        go("combo_same")
        compare("crash after step 3, resumed as it was (bitwise)", same, straight, 0.0)
        # The precomputed reference is reused by a resume, not scored again.
        pre, _ = go("combo_pre", {"dpo": {"reference": "precomputed"}}, env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "3"},
                    expect=137)
        _, r = go("combo_pre", {"dpo": {"reference": "precomputed"}})
        self.assertIn("precomputed for this run", r.stderr)
        compare("precomputed reference, crash and resume", pre, straight, 1e-5)
        bf16, _ = go("combo_bf16", {"amp": {"dtype": "bfloat16"}})
        a, b = train_rows(bf16), train_rows(straight)
        print(f"[dpo] bf16: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}; fp32 {b[0]['loss']:.4f} -> "
              f"{b[-1]['loss']:.4f}")
        self.assertLess(max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)), 5e-3)  # follows float32
        self.assertNotEqual([r["loss"] for r in a], [r["loss"] for r in b])  # autocast really ran
        # float16 with its loss scale: the scaled DPO loss unscales to float32's.
        fp16, _ = go("combo_fp16", {"amp": {"dtype": "float16"}})
        h = train_rows(fp16)
        print(f"[dpo] float16: loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}, loss scale {h[-1]['loss_scale']:g}, "
              f"skipped {h[-1]['skipped_steps']}; gradient norms vs float32's within "
              f"{max(abs(x['grad_norm'] / y['grad_norm'] - 1) for x, y in zip(h, b)):.2g}")
        self.assertLess(max(abs(x["loss"] - y["loss"]) for x, y in zip(h, b)), 5e-3)
        self.assertEqual(h[-1]["skipped_steps"], 0)
        # The gradients are unscaled before clipping and the log: float32's norms, not 65536 times them.
        self.assertLess(max(abs(x["grad_norm"] / y["grad_norm"] - 1) for x, y in zip(h, b)), 0.05)

    def test_freezing_offload_and_8bit_adamw_combine(self):
        """Full fine-tuning: a frozen block under activation checkpointing stays put while the
        others train; AdamW's state on the host gives the same weights; 8-bit AdamW trains."""
        before = load_file(os.path.join(self.model_dir, "model.safetensors"))
        c = self.config(lr=1e-2)
        c["model"].update({"freeze_blocks": 1, "activation_checkpointing": "all"})
        frozen, _, _ = ref.run_trainer(BIN, c, self.tmp, "freeze_ckpt")
        moved = {k: (frozen[k] - before[k]).abs().max().item() for k in before}
        block0 = max(v for k, v in moved.items() if k.startswith("transformer.h.0."))
        block1 = min(v for k, v in moved.items() if k.startswith("transformer.h.1.") and "ln_" not in k)
        print(f"[dpo] freeze_blocks 1 + checkpointing all: block 0 moved {block0:.3g}, block 1 at least {block1:.3g}")
        self.assertEqual(block0, 0.0)
        self.assertGreater(block1, 0.0)
        # The host runs torch's fused CPU AdamW, so the run in place uses it too: the unfused ops
        # round differently (by 2e-5 here after 4 steps on an AVX-512 machine).
        c = self.config(lr=1e-2, fused_adamw="on")
        plain, _, _ = ref.run_trainer(BIN, c, self.tmp, "host_plain")
        c["train"]["optimizer_offload"] = "cpu"
        host, _, _ = ref.run_trainer(BIN, c, self.tmp, "host_offload")
        diff = ref.max_weight_diff(host, plain)
        print(f"[dpo] optimizer_offload cpu vs on the device: weights max|diff| {diff:.3g}")
        self.assertLess(diff, 1e-6)
        # 8-bit AdamW (c_fc's 4096 values and up in 8-bit blocks) follows AdamW's losses.
        c = self.config(lr=1e-2, optimizer="adamw_8bit")
        _, metrics, _ = ref.run_trainer(BIN, c, self.tmp, "adamw8bit")
        eight = [r["loss"] for r in metrics if "loss" in r]
        full = [r["loss"] for r in train_rows(os.path.join(self.tmp, "host_plain"))]
        gap = max(abs(a - b) for a, b in zip(eight, full))
        print(f"[dpo] 8-bit AdamW: losses {['%.4f' % x for x in eight]} vs AdamW's {['%.4f' % x for x in full]}, "
              f"max gap {gap:.3g}")
        self.assertEqual(len(eight), len(full))
        self.assertLess(gap, 0.02)
        self.assertNotEqual(eight, full)

    def test_bad_input_is_a_clear_error(self):
        bad = [json.dumps(self.rows[0]), json.dumps({"prompt": "Q", "chosen": " a"}),
               json.dumps({"prompt": "Q", "chosen": " a", "rejected": " a"}),
               json.dumps({"prompt": "Q", "chosen": 3, "rejected": " b"})]
        path = write_jsonl(os.path.join(self.tmp, "bad.jsonl"), bad)
        base = ["tokenize", "--tokenizer", os.path.join(self.tmp, "tok"), "--input", path, "--prompt-field", "prompt",
                "--chosen-field", "chosen", "--rejected-field", "rejected", "--val-fraction", "0", "--no-progress"]
        r = run(*base, "--output-dir", os.path.join(self.tmp, "bad_out"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("bad.jsonl:2: no rejected field \"rejected\"", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "bad_out")))
        r = run(*base, "--output-dir", os.path.join(self.tmp, "bad_skip"), "--skip-bad-lines")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("hold the same text", r.stderr)
        self.assertIn("is number, expected a string", r.stderr)
        with open(os.path.join(self.tmp, "bad_skip", "manifest.json")) as f:
            m = json.load(f)
        self.assertEqual((m["examples"]["train"], m["skipped_lines"]), (1, 3))
        # A damaged shard: one flipped target bit.
        damaged = os.path.join(self.tmp, "damaged", "train_000000.bin")
        os.makedirs(os.path.dirname(damaged))
        with open(glob.glob(self.train_glob)[0], "rb") as f:
            raw = bytearray(f.read())
        raw[-1] ^= 1
        with open(damaged, "wb") as f:
            f.write(raw)
        c = self.config()
        c["data"]["train"] = damaged
        path, _ = write_config(c, self.tmp, "damaged_run")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("preference shard", r.stderr)
        self.assertIn("damaged", r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        # A garbage or empty file as data.train is said to be damaged, not taken for plain text.
        for name, raw in (("garbage", bytes(range(256)) * 12), ("empty", b"")):
            bad_shard = os.path.join(self.tmp, f"{name}_shard", "train_000000.bin")
            os.makedirs(os.path.dirname(bad_shard), exist_ok=True)
            with open(bad_shard, "wb") as f:
                f.write(raw)
            c = self.config()
            c["data"]["train"] = bad_shard
            path, _ = write_config(c, self.tmp, f"{name}_run")
            r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
            self.assertEqual(r.returncode, 1, r.stderr[-2000:])
            self.assertIn(bad_shard, r.stderr)
            self.assertIn("not a token shard", r.stderr)
            self.assertNotIn("holds plain text", r.stderr)
        # Preference shards without "dpo", and "base" without LoRA.
        c = self.config()
        del c["train"]["objective"]
        path, _ = write_config(c, self.tmp, "no_dpo")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("holds preference pairs: set train.objective \"dpo\"", r.stderr)
        c = self.config()
        docs = os.path.join(self.tmp, "docs_val")  # prompt/completion document shards as data.val
        c["data"]["val"] = os.path.join(docs, "train_*.bin")
        r = run("tokenize", "--tokenizer", os.path.join(self.tmp, "tok"), "--input",
                write_jsonl(os.path.join(self.tmp, "docs.jsonl"), [{"prompt": "Q", "completion": " a"}]),
                "--output-dir", docs, "--prompt-field", "prompt", "--completion-field", "completion",
                "--val-fraction", "0", "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr)
        path, _ = write_config(c, self.tmp, "val_of_documents")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("holds no preference pairs", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "val_of_documents", "metrics.jsonl")))  # refused at start
        c = self.config()
        c["dpo"] = {"reference": "base"}
        path, _ = write_config(c, self.tmp, "base_no_lora")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("dpo.reference \"base\"", r.stderr)
        # Another run's folder: refused, and its precomputed table is left as it was.
        c = self.config()
        c["checkpoint"] = {"every_steps": 2}
        path, out = write_config(c, self.tmp, "owner")
        self.assertEqual(subprocess.run([BIN, "--config", path], capture_output=True, timeout=600).returncode, 0)
        table = os.path.join(out, "reference_logps.safetensors")
        with open(table, "rb") as f:
            before = f.read()
        c["train"]["lr"] = 1e-4
        c["data"]["val"] = ""
        path, _ = write_config(c, self.tmp, "owner")
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 1)
        self.assertIn("another run", r.stderr)
        with open(table, "rb") as f:
            self.assertEqual(f.read(), before)
        print("[dpo] bad lines, a damaged shard, impossible settings and another run's folder are named errors")

    def test_real_text_raises_the_held_out_reward_accuracy(self):
        """Real Brown-corpus sentences against the same words shuffled, on GPT-2's real vocabulary."""
        vocab = os.path.join(SHARED, "data", "gpt2")
        corpus = os.path.join(SHARED, "data", "corpora", "brown.txt")
        if not (os.path.exists(os.path.join(vocab, "encoder.json")) and os.path.exists(corpus)):
            self.skipTest(f"needs the GPT-2 vocabulary and brown.txt under {SHARED}/data (absent)")
        rng = random.Random(0)
        with open(corpus, encoding="utf-8") as f:
            sentences = [s.strip() for s in f if 8 <= len(s.split()) <= 16]
        rng.shuffle(sentences)
        rows = []
        for s in sentences[:640]:
            words = s.split()
            cut = 3
            rest = words[cut:]
            shuffled = rest[:]
            while shuffled == rest:
                rng.shuffle(shuffled)
            rows.append({"prompt": " ".join(words[:cut]), "chosen": " " + " ".join(rest),
                         "rejected": " " + " ".join(shuffled)})
        out = os.path.join(self.tmp, "brown")
        r = run("tokenize", "--tokenizer", vocab, "--input", write_jsonl(os.path.join(self.tmp, "brown.jsonl"), rows),
                "--output-dir", out, "--prompt-field", "prompt", "--chosen-field", "chosen", "--rejected-field",
                "rejected", "--val-fraction", "0.2", "--no-progress")
        self.assertEqual(r.returncode, 0, r.stderr)
        model = ref.make_model(os.path.join(self.tmp, "brown_init"), vocab_size=50257, n_positions=64, n_embd=64,
                               n_head=4)
        c = {"model": {"init_from": model},
             "data": {"train": os.path.join(out, "train_*.bin"), "val": os.path.join(out, "val_*.bin"),
                      "seq_len": 48, "num_workers": 2},
             "train": {"objective": "dpo", "micro_batch_size": 32, "global_batch_size": 32, "max_steps": 40,
                       "lr": 3e-3, "warmup_steps": 5},
             "dpo": {"beta": 0.1},
             "eval": {"every_steps": 20},
             "log": {"every_steps": 10, "progress": "lines"}, "device": "cpu"}
        ref.run_trainer(BIN, c, self.tmp, "brown_run")
        vals = val_rows(os.path.join(self.tmp, "brown_run"))
        print(f"[dpo] real text: held-out reward accuracy {[round(v['val_rewards/accuracies'], 3) for v in vals]}, "
              f"DPO loss {[round(v['val_loss'], 4) for v in vals]} over {vals[-1]['val_tokens']} target tokens")
        self.assertGreater(vals[-1]["val_rewards/accuracies"], 0.75)
