"""The CPU memory rehearsal (memory/counting_allocator.h): real out-of-memory errors from the
counting allocator under cpu.memory_limit, wherever the allocation that crosses the cap happens,
and the planner against what it counts.

The cap sweep: uncapped runs at every micro batch from the configured one down to 1 measure the
peak of each phase of the step (their metrics' cpu_peak_by_phase_gb); the caps are set just
under each of those peaks (where an allocation in that phase is the one that crosses), plus
evenly spaced caps down to below the smallest micro batch's peak. Every run must end in one of
three ways:
  - exit 0 with the weights of a run that used its final micro batch from the start (within the
    accumulation tolerance), the global batch and the data position kept;
  - exit 75 (oom.policy "checkpoint_and_exit") or 77 (out of memory at the smallest micro batch)
    with a checkpoint that, run again (75) or run with more memory (77), finishes as above;
  - exit 1 with a one-line error that says it ran out of memory.
Never a crash, a hang or a traceback. The phases the errors landed in are printed."""
import json
import os
import subprocess
import sys
import unittest

import numpy as np
from safetensors.numpy import load_file

import train_reference as ref
from common import WorkDirTest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "bench"))
from instruction_bench import write_document_shard  # noqa: E402  (the document shard writer in numpy)

BIN = os.environ.get("GPT2FT_BIN", "")


def run(cfg, workdir, name, timeout=300):
    """The run, in one process, or with distributed.world (a test's key, taken out) ranks over
    Gloo: every rank must end with the same exit code; their stderr is joined."""
    cfg = dict(cfg)
    world = cfg.pop("world", 1)
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    if world == 1:
        r = subprocess.run([BIN, "--config", path], capture_output=True, text=True, timeout=timeout)
        r.rank_stderr = [r.stderr]
        return r
    from test_distributed import finish, free_port, start_ranks
    ends = finish(start_ranks(path, world, free_port()), timeout=timeout)
    codes = [rc for rc, _ in ends]
    assert len(set(codes)) == 1, f"the ranks ended differently: {codes}\n" + "\n".join(e[-2000:] for _, e in ends)
    r = subprocess.CompletedProcess(path, codes[0], "", "".join(e for _, e in ends))
    r.rank_stderr = [e for _, e in ends]
    return r


def rows(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def final_weights(out):
    """The trained tensors: the model, or a LoRA run's adapter."""
    adapter = os.path.join(out, "final", "adapter_model.safetensors")
    return load_file(adapter if os.path.exists(adapter) else os.path.join(out, "final", "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def phases_of(stderr):
    found = []
    for line in stderr.splitlines():
        at = line.find("CPU out of memory (in ")
        if at >= 0:
            found.append(line[at + len("CPU out of memory (in "):].split(")")[0])
    return found


class MemoryRehearsalTest(WorkDirTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = ref.make_model(os.path.join(cls.tmp, "init"), n_layer=2, n_head=2, n_embd=64, vocab_size=97,
                                       n_positions=64)
        ref.make_stream(os.path.join(cls.tmp, "train_000000.bin"), n=3000)
        ref.make_stream(os.path.join(cls.tmp, "val_000000.bin"), n=12 * 32 + 1, seed=3)
        rng = np.random.default_rng(5)  # document shards (data/shard.h): 120 documents of 4 to 31 tokens
        lengths = rng.integers(4, 32, size=120)
        tokens = rng.integers(0, 96, size=int(lengths.sum()))
        os.makedirs(os.path.join(cls.tmp, "docs"))
        write_document_shard(os.path.join(cls.tmp, "docs", "train_000000.bin"), tokens,
                             np.concatenate([[0], np.cumsum(lengths)[:-1]]), rng.random(tokens.size) < 0.7)

    def config(self, out, micro, cap=None, policy="backoff", **extra):
        c = {"model": {"init_from": self.model_dir, "dropout": 0.0},
             "data": {"train": os.path.join(self.tmp, "train_*.bin"), "val": os.path.join(self.tmp, "val_*.bin"),
                      "seq_len": 32, "num_workers": 1},
             "train": {"deterministic": True, "micro_batch_size": micro, "global_batch_size": 8, "max_steps": 4, "lr": 1e-3,
                       "warmup_steps": 0},
             "eval": {"every_steps": 2, "batch_size": 8},
             "checkpoint": {"every_steps": 2, "resume": "auto"},
             "oom": {"policy": policy},
             "log": {"every_steps": 1, "progress": "lines", "tensorboard": False},
             "output_dir": out, "device": "cpu"}
        for key, value in extra.items():
            if key == "world":  # ranks over Gloo (run() starts them)
                c["world"] = value
                c.setdefault("distributed", {})["backend"] = "gloo"
                continue
            section, name = key.split("__")
            c.setdefault(section, {})[name] = value
        if cap is not None:
            c["cpu"] = {"memory_limit": str(int(cap))}
        return c

    def clean(self, micro, **extra):
        """A run without a cap at this micro batch: its folder, its measured peak and each
        phase's peak (bytes)."""
        key = (micro, json.dumps(extra, sort_keys=True))
        if key not in self._clean:
            out = os.path.join(self.tmp, f"clean_{len(self._clean)}")
            r = run(self.config(out, micro, **extra), self.tmp, f"clean_{len(self._clean)}")
            self.assertEqual(r.returncode, 0, r.stderr[-3000:])
            logged = rows(out, "cpu_peak_allocated_gb")
            peak = max(row["cpu_peak_allocated_gb"] for row in logged) * 1e9
            phases = {}
            for row in logged:
                for phase, gb in row["cpu_peak_by_phase_gb"].items():
                    phases[phase] = max(phases.get(phase, 0), gb * 1e9)
            self._clean[key] = (out, peak, phases)
        return self._clean[key][:2]

    def sweep(self, label, policy="backoff", caps=6, **extra):
        self._clean = {}
        largest = 8 // extra.get("world", 1)  # the per-rank batch
        _, top = self.clean(largest, **extra)
        for micro in (4, 2):
            if micro < largest:
                self.clean(micro, **extra)
        _, floor = self.clean(1, **extra)
        print(f"[{label}] measured peak: micro 8 {top / 2**20:.2f} MiB, micro 1 {floor / 2**20:.2f} MiB")
        self.assertGreater(top, floor)
        critical = {int(p) - 64 for (_, _, phases) in self._clean.values() for p in phases.values() if p < top}
        spaced = {int(top - (top - 0.85 * floor) * (i + 0.5) / caps) for i in range(caps)}
        caps_to_try = sorted({c // 16384 * 16384 for c in critical | spaced}, reverse=True)  # 16 KiB apart at least
        outcomes, all_phases = [], []
        for i, cap in enumerate(caps_to_try):
            out = os.path.join(self.tmp, f"{label}_{i}")
            cfg = self.config(out, largest, cap=cap, policy=policy, **extra)
            stderr, codes = "", []
            for attempt in range(6):  # a 75 is run again as it is, as the Slurm wrapper would
                r = run(cfg, self.tmp, f"{label}_{i}")
                stderr += r.stderr
                codes.append(r.returncode)
                self.assertNotIn("Traceback", r.stderr)
                self.assertNotIn("terminate called", r.stderr)
                self.assertIn(r.returncode, (0, 1, 75, 77), f"cap {cap:.0f}: exit {r.returncode}\n{r.stderr[-3000:]}")
                if r.returncode != 75:
                    break
            phases = phases_of(stderr)
            all_phases += phases
            end = codes[-1]
            if end == 77:  # the smallest micro batch does not fit: with more memory, it resumes and finishes
                self.assertIn("smallest micro batch", stderr.lower().replace("oom.min_micro_batch_size", "smallest micro batch"))
                cfg.pop("cpu")
                r = run(cfg, self.tmp, f"{label}_{i}")
                self.assertEqual(r.returncode, 0, r.stderr[-3000:])
                end = "77 then 0"
            if end == 1:
                # Each process ends in one error line: the rank that ran out of memory says so,
                # the others that a rank failed.
                lasts = [[line for line in err.strip().splitlines() if line.strip()][-1] for err in r.rank_stderr]
                self.assertTrue(any("out of memory" in last for last in lasts), lasts)
                for last in lasts:
                    self.assertTrue("out of memory" in last or "Another rank probably failed" in last, last)
                    self.assertTrue(last.startswith("error:") or "error" in last[:40], last)
                outcomes.append((cap, codes, phases, "error: " + " | ".join(last[-160:] for last in lasts)))
                continue
            micro = rows(out, "micro_batch")[-1]["micro_batch"]
            clean_out, _ = self.clean(micro, **extra)
            diff = max_diff(final_weights(out), final_weights(clean_out))
            state = rows(out, "micro_batch")[-1]
            want = rows(clean_out, "micro_batch")[-1]
            self.assertEqual((state["step"], state["global_batch"], state["samples_in_epoch"], state["epoch"]),
                             (want["step"], want["global_batch"], want["samples_in_epoch"], want["epoch"]))
            self.assertLess(diff, 2e-5, f"cap {cap:.0f}: weights vs a clean micro {micro} run")
            outcomes.append((cap, codes, phases, f"finished at micro {micro}, max|dw| vs clean {diff:.2g}"))
        for micro, (_, peak, phases) in sorted((k[0], v) for k, v in self._clean.items()):
            print(f"[{label}] uncapped micro {micro}: peak {peak / 2**20:.3f} MiB; by phase (MiB): "
                  + ", ".join(f"{p} {b / 2**20:.3f}" for p, b in sorted(phases.items(), key=lambda x: -x[1])))
        for cap, codes, phases, what in outcomes:
            print(f"[{label}] cap {cap / 2**20:7.2f} MiB: exits {codes}, errors in {phases or '-'}: {what}")
        distinct = sorted(set(all_phases))
        print(f"[{label}] {len(outcomes)} caps; errors landed in: {distinct}")
        return outcomes, distinct

    def test_cap_sweep_backs_off_or_ends_cleanly(self):
        outcomes, phases = self.sweep("backoff", caps=8)
        for phase in ("forward", "loss", "backward"):
            self.assertIn(phase, phases)
        self.assertTrue(any("finished at micro" in o[3] and o[1] == [0] for o in outcomes))

    def test_cap_sweep_with_checkpoint_and_exit(self):
        outcomes, phases = self.sweep("exit75", policy="checkpoint_and_exit", caps=4)
        self.assertTrue(any(75 in o[1] for o in outcomes), outcomes)

    def test_cap_sweep_short_rows_reach_the_optimizer_and_validation(self):
        # Short rows and a large evaluation batch: the optimizer's step and validation, not the
        # forward pass, hold the most memory.
        outcomes, phases = self.sweep("short", caps=3, data__seq_len=4, eval__batch_size=96,
                                      train__fused_adamw="off")
        self.assertIn("optimizer", phases)
        self.assertIn("validation", phases)
        # Validation backed off alone: the training micro batch stayed at 8.
        self.assertTrue(any("validation" in o[2] and "finished at micro 8" in o[3] for o in outcomes), outcomes)

    def test_cap_sweep_with_lora_on_packed_documents(self):
        outcomes, phases = self.sweep("lora_docs", caps=5, model__lora={"rank": 4, "targets": ["c_attn", "c_fc"]},
                                      data__train=os.path.join(self.tmp, "docs", "train_*.bin"),
                                      data__packing="documents", data__val="")
        self.assertGreaterEqual(len(phases), 2, outcomes)  # the errors landed in more than one phase
        self.assertTrue(any("finished at micro" in o[3] for o in outcomes), outcomes)

    def test_cap_sweep_over_two_ranks_with_zero1(self):
        # Each rank has the cap; a rank out of memory makes every rank back off together.
        outcomes, phases = self.sweep("two_ranks", caps=4, world=2, distributed__shard_optimizer=True)
        self.assertGreaterEqual(len(phases), 2, outcomes)
        self.assertTrue(any("finished at micro" in o[3] for o in outcomes), outcomes)

    def test_cap_sweep_with_8bit_adamw_and_checkpointing(self):
        self.sweep("8bit", caps=4, train__optimizer="adamw_8bit", model__activation_checkpointing="all")


class PlannerAgainstCountTest(WorkDirTest):
    """`plan --measure` on the CPU: the planner's predicted peak against the peak the counting
    allocator measured over 3 real steps, for each lever alone, at micro batch 1 and 4. The
    planner derives each term from the shapes (memory/planner.cpp); nothing here comes from a
    run of ours."""
    GRID = [("plain", []),
            ("checkpointing all", ["model.activation_checkpointing=all"]),
            ("checkpointing every 2nd", ["model.activation_checkpointing=2"]),
            ("bf16 autocast", ["amp.dtype=bfloat16"]),
            ("accumulation x4", ["train.global_batch_size=ACC"]),
            ("unfused AdamW", ["train.fused_adamw=off"]),
            ("8-bit AdamW", ["train.optimizer=adamw_8bit"]),
            ("offload", ["train.optimizer_offload=cpu"]),
            ("LoRA r=8", ["model.lora.rank=8"]),
            ("LoRA r=8 on every projection, dropout", ["model.lora.rank=8", "model.lora.targets=[\"c_attn\",\"c_proj\",\"c_fc\"]",
                                                       "model.lora.dropout=0.1"]),
            ("LoRA r=8, bf16 base", ["model.lora.rank=8", "model.lora.base_dtype=bfloat16", "amp.dtype=bfloat16"]),
            ("frozen embeddings + 2 blocks", ["model.freeze_embeddings=true", "model.freeze_blocks=2"]),
            ("frozen 2 blocks, embeddings trained", ["model.freeze_blocks=2"]),
            ("dropout 0.1", ["model.dropout=0.1"]),
            ("dropout 0.1, bf16", ["model.dropout=0.1", "amp.dtype=bfloat16"]),
            ("packed documents", ["PACKED"]),
            ("packed documents, bf16, checkpointing every 2nd", ["PACKED", "amp.dtype=bfloat16",
                                                                 "model.activation_checkpointing=2"]),
            ("DPO, precomputed reference", ["PREF"]),
            ("DPO, frozen copy, bf16", ["PREF", "dpo.reference=model", "amp.dtype=bfloat16"]),
            ("DPO, LoRA r=8, base reference, checkpointing all", ["PREF", "model.lora.rank=8", "dpo.reference=base",
                                                                  "model.activation_checkpointing=all"])]

    def test_planner_within_ten_percent_of_the_counted_peak(self):
        T, vocab = 64, 512
        model = ref.make_model(os.path.join(self.tmp, "init"), n_layer=4, n_head=4, n_embd=128, vocab_size=vocab,
                               n_positions=T)
        ref.make_stream(os.path.join(self.tmp, "train_000000.bin"), n=40 * (T + 1), vocab=vocab)
        rng = np.random.default_rng(0)
        lengths = rng.integers(5, T, size=200)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        tokens = rng.integers(0, vocab - 1, size=int(lengths.sum()))
        targets = rng.random(tokens.size) < 0.6
        os.makedirs(os.path.join(self.tmp, "docs"))
        write_document_shard(os.path.join(self.tmp, "docs", "train_000000.bin"), tokens, starts, targets)
        # Preference pairs: one prompt, two continuations, each side at most T+1 tokens.
        tokens, starts, targets = [], [], []
        for _ in range(60):
            prompt = [vocab - 1] + rng.integers(0, vocab - 1, size=int(rng.integers(2, T // 2))).tolist()
            for _side in range(2):
                continuation = rng.integers(0, vocab - 1, size=int(rng.integers(2, T // 2))).tolist() + [vocab - 1]
                starts.append(len(tokens))
                tokens += prompt + continuation
                targets += [False] * len(prompt) + [True] * len(continuation)
        os.makedirs(os.path.join(self.tmp, "pref"))
        write_document_shard(os.path.join(self.tmp, "pref", "train_000000.bin"), tokens, starts, targets,
                             magic=20261206, version=1)
        cfg = os.path.join(self.tmp, "plan.json")
        with open(cfg, "w") as f:
            json.dump({"model": {"init_from": model, "dropout": 0.0},
                       "data": {"train": os.path.join(self.tmp, "train_*.bin"), "seq_len": T, "num_workers": 1},
                       "train": {"max_steps": 3}, "device": "cpu", "log": {"tensorboard": False}}, f)
        worst = 0.0
        for name, sets in self.GRID:
            for micro in (1, 4):
                args = [BIN, "plan", "--config", cfg, "--measure", "--json", "--set", f"train.micro_batch_size={micro}",
                        "--set", f"train.global_batch_size={4 * micro if 'train.global_batch_size=ACC' in sets else micro}"]
                for s in sets:
                    if s == "PACKED":
                        args += ["--set", "data.train=" + os.path.join(self.tmp, "docs", "train_*.bin"),
                                 "--set", "data.packing=documents"]
                    elif s == "PREF":
                        args += ["--set", "data.train=" + os.path.join(self.tmp, "pref", "train_*.bin"),
                                 "--set", "train.objective=dpo"]
                    elif not s.startswith("train.global_batch_size"):
                        args += ["--set", s]
                r = subprocess.run(args, capture_output=True, text=True, timeout=300)
                self.assertEqual(r.returncode, 0, f"{name}: {r.stderr[-3000:]}")
                # The measuring run's own log stays out of plan's report (it runs in a child process).
                self.assertNotIn("| loss", r.stderr)
                self.assertNotIn("model saved to", r.stderr)
                out = json.loads(r.stdout.strip().splitlines()[-1])
                predicted, measured = out["predicted_peak"], out["measured_peak_allocated"]
                error = predicted / measured - 1
                worst = max(worst, abs(error))
                print(f"[planner] {name:48s} micro {micro}: predicted {predicted / 2**20:7.2f} MiB, "
                      f"measured {measured / 2**20:7.2f} MiB, {100 * error:+.1f}%")
                with self.subTest(config=name, micro=micro):
                    self.assertLess(abs(error), 0.10)
        # Two Gloo ranks, with and without ZeRO-1: rank 0's counted peak (its metrics) against
        # `plan --gpus 2` (the most loaded rank's optimizer state under ZeRO-1).
        from test_distributed import finish, free_port, start_ranks
        for shard in (False, True):
            out = os.path.join(self.tmp, f"ranks_{shard}")
            with open(cfg) as f:
                c = json.load(f)
            c["train"].update({"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 3})
            c.update(output_dir=out, distributed={"backend": "gloo", "shard_optimizer": shard},
                     log={"every_steps": 1, "tensorboard": False}, checkpoint={"at_end": False})
            path = os.path.join(self.tmp, f"ranks_{shard}.json")
            with open(path, "w") as f:
                json.dump(c, f)
            for rank, (rc, err) in enumerate(finish(start_ranks(path, 2, free_port()))):
                self.assertEqual(rc, 0, f"rank {rank}: {err[-3000:]}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                measured = max(r["cpu_peak_allocated_gb"] for r in map(json.loads, f) if "cpu_peak_allocated_gb" in r) * 1e9
            r = subprocess.run([BIN, "plan", "--config", path, "--json", "--gpus", "2"], capture_output=True, text=True,
                               timeout=300)
            self.assertEqual(r.returncode, 0, r.stderr[-3000:])
            predicted = json.loads(r.stdout.strip().splitlines()[-1])["predicted_peak"]
            error = predicted / measured - 1
            worst = max(worst, abs(error))
            print(f"[planner] {'2 ranks, ZeRO-1' if shard else '2 ranks':48s} micro 4: predicted "
                  f"{predicted / 2**20:7.2f} MiB, measured {measured / 2**20:7.2f} MiB, {100 * error:+.1f}%")
            with self.subTest(config="2 ranks", zero1=shard):
                self.assertLess(abs(error), 0.10)
        print(f"[planner] worst |error| {100 * worst:.1f}%")


if __name__ == "__main__":
    unittest.main()
