"""The out-of-memory advice, followed as printed. A run under cpu.memory_limit that cannot fit
at micro batch 1 exits 77 with plan's advice; running the command it prints must resume from
the checkpoint at the next sample and finish. Every lever plan names is followed the same way
from one checkpoint: those that change only memory give the weights of a run without them;
8-bit AdamW and autocast convert the state and follow a run that used them from the start;
freezing drops the frozen parts' optimizer state and keeps their weights; the levers that make
another run (shorter samples, LoRA) start a new run from the checkpoint's weights in another
output_dir. Run by ctest (`oom_advice.*`), which sets GPT2FT_BIN."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

import torch
from safetensors.torch import load_file

import train_reference as ref
from common import WorkDirTest
from test_chat import write_tokenizer

BIN = os.environ.get("GPT2FT_BIN", "")
T = 64


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    """{step: loss} of the training rows."""
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


class OomAdviceTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tok = os.path.join(cls.tmp, "tok")
        write_tokenizer(cls.tok, ["alpha beta gamma delta river stone cloud paper green quiet seven"])
        cls.model = ref.make_model(os.path.join(cls.tmp, "init"), n_layer=4, n_head=4, n_embd=128, vocab_size=512,
                                   n_positions=T)
        for name in os.listdir(cls.tok):  # the model's tokenizer: final/ folders must carry it on
            if name != "config.json":
                shutil.copy(os.path.join(cls.tok, name), cls.model)
        ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"), n=40 * (T + 1), vocab=512)

    def config(self, out):
        c = {"model": {"init_from": self.model, "dropout": 0.0},
             "data": {"train": os.path.join(self.tmp, "train_*.bin"), "seq_len": T, "num_workers": 1},
             "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6, "lr": 1e-3,
                       "warmup_steps": 0, "fused_adamw": "on", "deterministic": True},
             "checkpoint": {"every_steps": 2},
             "log": {"every_steps": 1, "progress": "lines", "tensorboard": False},
             "output_dir": out, "device": "cpu"}
        path = out + ".json"
        with open(path, "w") as f:
            json.dump(c, f)
        return path

    def run_cmd(self, args, env=None, expect=0):
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
        self.assertEqual(r.returncode, expect, f"{shlex.join(args)}\n{r.stderr[-3000:]}")
        self.assertNotIn("terminate called", r.stderr)
        return r

    def checkpointed(self, name):
        """A run of 6 steps stopped after step 2 with its checkpoint: (config path, folder)."""
        out = os.path.join(self.tmp, name)
        path = self.config(out)
        self.run_cmd([BIN, "--config", path], env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "2"}, expect=137)
        return path, out

    def resumed_at_the_next_sample(self, out, straight):
        """The run resumed from step 2 and ended where the straight run did, sample for sample."""
        resumed = [r["resumed"] for r in metrics(out) if "resumed" in r]
        self.assertEqual(resumed[-1]["step"], 2)
        end, want = [r for r in metrics(out) if "samples_in_epoch" in r][-1], \
            [r for r in metrics(straight) if "samples_in_epoch" in r][-1]
        self.assertEqual((end["step"], end["global_batch"], end["samples_in_epoch"], end["epoch"]),
                         (want["step"], want["global_batch"], want["samples_in_epoch"], want["epoch"]))
        return resumed[-1]

    def test_every_lever_of_the_advice_resumes_or_starts_a_new_run(self):
        straight = os.path.join(self.tmp, "straight")
        self.run_cmd([BIN, "--config", self.config(straight)])
        path, _ = self.checkpointed("base")
        # Every lever plan names for this run when memory is short (on one process: ZeRO-1's
        # other GPU counts are the distributed tests' business).
        r = self.run_cmd([BIN, "plan", "--config", path, "--json", "--set", "cpu.memory_limit=1MB"])
        advice = json.loads(r.stdout.strip().splitlines()[-1])["advice"]
        levers = [lever for lever in advice["levers"] if lever["gpus"] == 1]
        names = [lever["name"] for lever in levers]
        print(f"[advice] plan's levers: {names}")
        self.assertTrue(any("8-bit" in n for n in names) and any("freeze" in n for n in names), names)
        self.assertTrue(any(not lever["resumable"] for lever in levers), "no lever that makes a new run")
        # Two more levers users set by hand that change only memory.
        levers += [{"name": "micro batch 1", "settings": ["train.micro_batch_size=1"], "resumable": True},
                   {"name": "eager loss", "settings": ["train.chunked_loss=false"], "resumable": True},
                   {"name": "optimizer offload", "settings": ["train.optimizer_offload=cpu"], "resumable": True},
                   {"name": "bf16 autocast", "settings": ["amp.dtype=bfloat16"], "resumable": True}]
        base_ckpt = os.path.join(self.tmp, "base", "checkpoints", "step_00000002")
        at_2 = weights(base_ckpt)
        final = weights(os.path.join(straight, "final"))
        for i, lever in enumerate(levers):
            sets = [a for s in lever["settings"] for a in ("--set", s)]
            name = f"lever_{i}"
            if not lever["resumable"]:
                # A new run from the checkpoint's weights in another output_dir.
                out = os.path.join(self.tmp, name)
                self.run_cmd([BIN, "--config", path, "--set", f"model.init_from={base_ckpt}", "--set",
                              f"output_dir={out}", *sets])
                self.assertEqual(min(losses(out)), 1, "a new run counts its own steps")
                first = metrics(out)
                self.assertFalse(any("resumed" in r for r in first))
                self.assertTrue(os.path.exists(os.path.join(out, "final", "vocab.json")),
                                "the tokenizer of the run's model, found through the checkpoint")
                print(f"[advice] {lever['name']}: a new run from the checkpoint's weights: losses "
                      f"{[round(x, 4) for x in losses(out).values()]}")
                continue
            out = os.path.join(self.tmp, name)
            shutil.copytree(os.path.join(self.tmp, "base"), out)
            self.run_cmd([BIN, "--config", path, "--set", f"output_dir={out}", *sets])
            resumed = self.resumed_at_the_next_sample(out, straight)
            got = weights(os.path.join(out, "final"))
            diff = max_diff(got, final)
            settings = " ".join(lever["settings"])
            if any(s.startswith(("train.optimizer=", "amp.dtype=", "model.freeze")) for s in lever["settings"]):
                self.assertTrue(resumed.get("changed"), f"{settings}: no 'changed' in the resumed row {resumed}")
            if "train.optimizer=adamw_8bit" in lever["settings"]:
                # The moments were quantized at load: the run follows one that was 8-bit from the start.
                from_start = os.path.join(self.tmp, name + "_from_start")
                self.run_cmd([BIN, "--config", path, "--set", f"output_dir={from_start}", *sets])
                a, b = losses(out), losses(from_start)
                gap = max(abs(a[s] - b[s]) for s in range(3, 7))
                moved = max_diff(got, at_2)
                off = max_diff(got, weights(os.path.join(from_start, "final")))
                print(f"[advice] {settings}: resumed with quantized moments; losses 3-6 within {gap:.2g} of a run "
                      f"8-bit from the start, weights {off:.2g} apart (they moved {moved:.2g} since step 2)")
                self.assertLess(gap, 0.02)
                self.assertLess(off, 0.5 * moved)
                state = load_file(os.path.join(out, "checkpoints", "step_00000006", "trainer_state.safetensors"))
                self.assertTrue(any(k.startswith("adamw8bit.exp_avg.scales.") for k in state))
            elif any(s.startswith("model.freeze") for s in lever["settings"]):
                frozen = [k for k in got if torch.equal(got[k], at_2[k])]
                trained = [k for k in got if not torch.equal(got[k], at_2[k])]
                state = load_file(os.path.join(out, "checkpoints", "step_00000006", "trainer_state.safetensors"))
                print(f"[advice] {settings}: {len(frozen)} tensors kept their step-2 weights, {len(trained)} trained on")
                self.assertIn("transformer.h.0.attn.c_attn.weight", frozen)
                self.assertIn("transformer.h.3.attn.c_attn.weight", trained)
                self.assertFalse(any(k.endswith("transformer.h.0.attn.c_attn.weight") for k in state),
                                 "the frozen parts' optimizer state is dropped")
            elif "amp.dtype=bfloat16" in lever["settings"]:
                a, b = losses(out), losses(straight)
                gap = max(abs(a[s] - b[s]) for s in range(3, 7))
                print(f"[advice] {settings}: resumed under bf16 autocast: losses 3-6 within {gap:.2g} of float32's")
                self.assertLess(gap, 0.02)
                self.assertNotEqual([a[s] for s in range(3, 7)], [b[s] for s in range(3, 7)])
            else:  # memory only: the weights of the run without it
                print(f"[advice] {settings}: resumed, weights {diff:.2g} from the run without it")
                self.assertLess(diff, 1e-5, settings)

    def test_the_printed_advice_of_exit_77_resumes_when_followed_verbatim(self):
        """Caps from 14 to 24 MiB: the first that ends in exit 77 (the smallest micro batch does
        not fit) prints a command; run as printed it resumes at the next sample and finishes."""
        straight = os.path.join(self.tmp, "straight77")
        self.run_cmd([BIN, "--config", self.config(straight)])
        for mib in range(14, 25):
            path, out = self.checkpointed(f"cap_{mib}")
            cap = ["--set", f"cpu.memory_limit={mib}MiB"]
            r = subprocess.run([BIN, "--config", path, *cap], capture_output=True, text=True, timeout=300)
            if r.returncode == 77:
                break
        else:
            self.fail("no cap from 14 to 24 MiB ended in exit 77")
        last = r.stderr.strip().splitlines()[-1]
        print(f"[advice] cap {mib} MiB: exit 77: {last[last.find('plan'):]}")
        m = re.search(r"Run the same command again with((?: --set \S+)+): it resumes", last)
        self.assertIsNotNone(m, last)
        self.run_cmd([BIN, "--config", path, *cap, *shlex.split(m.group(1))])
        resumed = self.resumed_at_the_next_sample(out, straight)
        print(f"[advice] followed verbatim: resumed at step {resumed['step']}, changed {resumed.get('changed')}, "
              f"finished at step {max(losses(out))}")
        self.assertEqual(max(losses(out)), 6)


    def test_plan_measure_never_takes_the_machine_down(self):
        """plan --measure refuses a peak beyond the machine's available memory, ends at once on
        SIGTERM, leaves no scratch folder on any path and keeps the measuring run's log out of its
        report; the measuring run saves no model (train --no-final-model); a host that refuses
        memory (ulimit -v) ends a run in one error line, not an abort."""
        path = self.config(os.path.join(self.tmp, "measure"))
        scratch = lambda pid: os.path.join(tempfile.gettempdir(), f"gpt2ft-plan-{pid}")
        # Far beyond any machine: gpt2-xl at T=1024, micro batch 32 (about 170 GiB predicted).
        huge = ["--set", "model.init_from=", "--set", "model.preset=gpt2-xl", "--set", "data.seq_len=1024",
                "--set", "train.micro_batch_size=32", "--set", "train.global_batch_size=32"]
        r = self.run_cmd([BIN, "plan", "--config", path, "--measure", *huge], expect=1)
        self.assertIn("more than this machine's available memory", r.stderr)
        self.assertIn("--set cpu.memory_limit=", r.stderr)
        # A long measurement stopped by SIGTERM: exit 76 within seconds, its folder gone.
        slow = ["--set", "model.init_from=", "--set", "model.preset=gpt2", "--set", "data.seq_len=64",
                "--set", "train.micro_batch_size=8"]
        p = subprocess.Popen([BIN, "plan", "--config", path, "--measure", *slow], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not os.path.exists(os.path.join(scratch(p.pid), "train.log")):
            time.sleep(0.05)
        time.sleep(0.5)
        sent = time.time()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        took = time.time() - sent
        print(f"[measure] SIGTERM: exit {p.returncode} after {took:.2f} s: {err.strip().splitlines()[-1]}")
        self.assertEqual(p.returncode, 76, err[-2000:])
        self.assertLess(took, 5)
        self.assertFalse(os.path.exists(scratch(p.pid)))
        # A measurement that fails (a cap the run cannot live in): one line naming the run's error, no folder left.
        p = subprocess.run([BIN, "plan", "--config", path, "--measure", "--set", "cpu.memory_limit=1MB"],
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 1, p.stderr[-2000:])
        self.assertIn("the measuring run (micro batch 4) failed", p.stderr)
        self.assertNotIn("| loss", p.stderr)
        leftovers = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("gpt2ft-plan-")]
        self.assertFalse([d for d in leftovers if not os.path.exists(f"/proc/{d.rsplit('-', 1)[1]}")], leftovers)
        # The measuring run's own flag: no final/.
        out = os.path.join(self.tmp, "no_final")
        r = self.run_cmd([BIN, "train", "--config", path, "--set", f"output_dir={out}", "--set", "train.max_steps=1",
                          "--no-final-model"])
        self.assertIn("no model saved", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "final")))
        # The host refusing memory (an address-space limit) mid-run: one error line, exit 1, no abort.
        refused = False
        for limit_kb in (3000000, 3500000, 4000000):
            r = subprocess.run(["bash", "-c", f"ulimit -v {limit_kb}; exec \"$0\" \"$@\"", BIN, "--config", path,
                                "--set", f"output_dir={self.tmp}/ulimit_{limit_kb}", *slow],
                               capture_output=True, text=True, timeout=300)
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            self.assertNotIn("enforce fail", r.stderr)
            self.assertNotEqual(r.returncode, -6, "aborted")
            if r.returncode == 1 and "the host refused" in last:
                refused = True
                print(f"[measure] ulimit -v {limit_kb}: {last}")
                self.assertTrue(last.startswith("gpt2-finetune: error: CPU out of memory"), last)
        self.assertTrue(refused, "no address-space limit reached an allocation (libraries need more here?)")


    def test_a_newcomers_rough_edges(self):
        """The start logs a summary, not ~110 lines of JSON; a resume with a new max_steps says how
        the learning rate moved; the last line gives the run's step and this invocation's share;
        float16 on the CPU warns and names bfloat16; eval's window defaults to the model's
        n_positions (64 here, not 1024); the Slurm scripts have --help."""
        path, out = self.checkpointed("edges")
        r = self.run_cmd([BIN, "--config", path, "--set", "train.max_steps=10", "--set", "train.lr_schedule=cosine"])
        before_first_step = r.stderr.split("step      3/")[0]
        print(f"[edges] {len(before_first_step.splitlines())} log lines before the first step")
        self.assertLess(len(before_first_step.splitlines()), 15)
        self.assertNotIn('"micro_batch_size"', r.stderr)
        self.assertTrue(os.path.exists(os.path.join(out, "train_config.json")))
        moved = [line for line in r.stderr.splitlines() if "the run's length changed on resume" in line]
        self.assertEqual(len(moved), 1, r.stderr[-2000:])
        print(f"[edges] {moved[0][moved[0].find('the run'):]}")
        self.assertIn("10 steps, the checkpoint's run 6 (train.max_steps)", moved[0])
        done = [line for line in r.stderr.splitlines() if "done:" in line][-1]
        print(f"[edges] {done[done.find('done'):]}")
        self.assertIn("the run is at step 10 of 10 (8 trained in this invocation", done)
        r = self.run_cmd([BIN, "--config", path, "--set", f"output_dir={out}_fp16", "--set", "amp.dtype=float16",
                          "--set", "train.max_steps=1"])
        self.assertIn('amp.dtype "float16" on the CPU', r.stderr)
        self.assertIn('"bfloat16" is the CPU\'s 16-bit autocast', r.stderr)
        r = self.run_cmd([BIN, "eval", "--model", os.path.join(out, "final"), "--data",
                          os.path.join(self.tmp, "train_*.bin"), "--json"])
        self.assertGreater(json.loads(r.stdout.strip().splitlines()[-1])["tokens"], 0)
        # micro_batch_size "auto" with gradient_accumulation_steps, as Hugging Face users write it:
        # the global batch is the micro batch it picks x 2; a resume on less memory keeps that
        # global batch with a smaller micro batch.
        auto = ["--set", "train.micro_batch_size=auto", "--set", "train.global_batch_size=0", "--set",
                "train.gradient_accumulation_steps=2", "--set", f"output_dir={out}_auto"]
        r = self.run_cmd([BIN, "--config", path, *auto, "--set", "cpu.memory_limit=40MB"],
                         env={"GPT2FT_FAULT_CRASH_AFTER_STEP": "2"}, expect=137)
        m = re.search(r"micro batch (\d+) \(the largest that fits .*so the global batch is \d+ x 2 x 1 rank\(s\) = (\d+)",
                      r.stderr)
        self.assertIsNotNone(m, r.stderr[-2000:])
        micro, global_batch = int(m.group(1)), int(m.group(2))
        self.assertEqual(global_batch, 2 * micro)
        r = self.run_cmd([BIN, "--config", path, *auto, "--set", "cpu.memory_limit=30MB"])
        self.assertIn(f"the run's global batch is the checkpoint's, {global_batch}", r.stderr)
        split = re.search(r"micro batch \d+ x accumulation \d+ = global batch \d+", r.stderr)
        self.assertIsNotNone(split, r.stderr[-2000:])
        self.assertTrue(split.group(0).endswith(f"= global batch {global_batch}"), split.group(0))
        print(f"[edges] auto with accumulation 2: micro {micro}, global {global_batch}; resumed on less memory: "
              f"{split.group(0)}")
        # The Slurm scripts answer --help with their usage (not "... is not the checkout").
        slurm = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "scripts", "slurm")
        for script, expect in (("run-training.sh", "run-training.sh CONFIG"),
                               ("train-1node.sbatch", "sbatch scripts/slurm/train-1node.sbatch"),
                               ("train-multinode.sbatch", "sbatch scripts/slurm/train-multinode.sbatch")):
            r = self.run_cmd(["bash", os.path.join(slurm, script), "--help"])
            self.assertIn(expect, r.stdout, script)


if __name__ == "__main__":
    import unittest
    unittest.main()
