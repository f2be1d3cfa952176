#!/usr/bin/env python3
"""Determinism soak: the same small training run, repeated while other processes load every
core (and, with --concurrent, while copies of itself run beside it), must give bitwise the same
final weights, last checkpoint (optimizer state, RNG, loader position) and metrics rows
(timings aside) every time. Any difference means something in a run depends on timing: a
loader slot, a writer, a signal, a thread count.

The run: accumulation 4 x micro 2 with activation checkpointing, dropout 0.1 (RNG replay),
2 loader workers with shuffling, validation and a checkpoint every 2 steps.

What it found: MKL (libtorch's CPU matmuls) chose its kernel at start-up depending on the
machine's load, so 2-3% of runs computed a first-step loss 1.5e-6 apart, and splits of the
batch or a resume were then not bitwise equal (4 of 16 runs differed here). gpt2-finetune now
fixes MKL's kernel (core/reproducible_math.h).

  .venv/bin/python scripts/soak/determinism.py N [--load K] [--concurrent C]
Exit 0 when all N runs agree, 1 otherwise (naming the first difference)."""
import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("GPT2FT_BIN", os.path.join(ROOT, "build", "gpt2-finetune"))
TIMING = {"tokens_per_s", "step_ms", "mfu", "time", "elapsed_s", "eta_s", "seconds"}


def make_inputs(work):
    shape = os.path.join(work, "shape.json")
    with open(shape, "w") as f:
        json.dump({"n_layer": 3, "n_head": 2, "n_embd": 32, "vocab_size": 97, "n_positions": 32}, f)
    subprocess.run([BIN, "init", "--config-json", shape, "--output", os.path.join(work, "model"), "--seed", "3"],
                   check=True, capture_output=True)
    rng = np.random.default_rng(0)
    for name, n in (("train_000000.bin", 6000), ("val_000000.bin", 700)):
        tokens = rng.integers(0, 97, size=n)
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (20240520, 1, n)
        with open(os.path.join(work, name), "wb") as f:
            f.write(header.tobytes() + tokens.astype(np.uint16).tobytes())


def config(work, out, amp):
    return {"amp": {"dtype": amp},"model": {"init_from": os.path.join(work, "model"), "dropout": 0.1, "activation_checkpointing": "all"},
            "data": {"train": os.path.join(work, "train_*.bin"), "val": os.path.join(work, "val_*.bin"),
                     "seq_len": 16, "num_workers": 2, "shuffle": True},
            "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6, "lr": 1e-3, "warmup_steps": 1,
                      "deterministic": True},
            "eval": {"every_steps": 2},
            "checkpoint": {"every_steps": 2, "keep_last": 1, "resume": "none"},
            "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out, "device": "cpu"}


def fingerprint(out):
    """What must be bitwise equal between runs: file hashes and the metrics without timings."""
    def sha(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    ckpt = os.path.join(out, "checkpoints", latest)
    rows = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.append({k: v for k, v in row.items() if k not in TIMING and not k.startswith("cuda_")})
    return {"final/model.safetensors": sha(os.path.join(out, "final", "model.safetensors")),
            f"checkpoint {latest}/trainer_state.safetensors": sha(os.path.join(ckpt, "trainer_state.safetensors")),
            f"checkpoint {latest}/model.safetensors": sha(os.path.join(ckpt, "model.safetensors")),
            "metrics": rows}


def first_difference(rows, reference):
    """For metrics: the first row that differs and how (the step tells when a run went apart)."""
    if not isinstance(rows, list):
        return ""
    for a, b in zip(rows, reference):
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            return f" from step {a.get('step')}: " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
    return f" ({len(rows)} rows vs {len(reference)})"


def burn(stop_at):
    x = 1.0
    while time.time() < stop_at:
        for _ in range(10000):
            x = x * 1.0000001 + 1e-9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=int)
    ap.add_argument("--load", type=int, default=os.cpu_count(), help="busy processes beside the runs")
    ap.add_argument("--concurrent", type=int, default=2, help="runs at once")
    ap.add_argument("--amp", default="none", choices=["none", "bfloat16"], help="autocast dtype of the run")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="gpt2ft-determinism-")
    try:
        make_inputs(work)
        burners = [multiprocessing.Process(target=burn, args=(time.time() + 3600,), daemon=True)
                   for _ in range(args.load)]
        for b in burners:
            b.start()
        reference, differences, done, t0 = None, [], 0, time.time()
        try:
            while done < args.runs:
                batch = []
                for k in range(min(args.concurrent, args.runs - done)):
                    out = os.path.join(work, f"run{done + k}")
                    path = out + ".json"
                    with open(path, "w") as f:
                        json.dump(config(work, out, args.amp), f)
                    batch.append((out, subprocess.Popen([BIN, "--config", path], stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.PIPE, text=True)))
                for out, p in batch:
                    _, err = p.communicate(timeout=600)
                    if p.returncode != 0:
                        sys.exit(f"run {out} failed (exit {p.returncode}):\n{err[-2000:]}")
                    f = fingerprint(out)
                    if reference is None:
                        reference = f
                    else:
                        for key in reference:
                            if f[key] != reference[key]:
                                differences.append((os.path.basename(out), key, first_difference(f[key], reference[key])))
                    shutil.rmtree(out)
                done += len(batch)
        finally:
            for b in burners:
                b.terminate()
        print(f"determinism soak: {args.runs} runs ({args.concurrent} at a time, {args.load} busy processes beside them) "
              f"in {time.time() - t0:.0f}s: {len(differences)} difference(s)")
        for run, key, where in differences[:10]:
            print(f"  {run}: {key} differs from run0{where}")
        sys.exit(1 if differences else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
