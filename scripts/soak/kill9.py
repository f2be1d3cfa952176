#!/usr/bin/env python3
"""kill -9 soak: a small training run with a checkpoint after every step is killed with SIGKILL
at random moments (during start-up, steps and checkpoint writes) and started again each time
with checkpoint.resume "auto". Counts the kills, the restarts that could not resume (any exit
other than success or a kill), and at the end of every round (a run that reached its last
step) compares its final weights and optimizer state with an uninterrupted run: they must be
bitwise equal. Leftover temporary checkpoint folders are counted too.

  .venv/bin/python scripts/soak/kill9.py N [--seed S]      (scripts/soak/kill9.sh N)
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("GPT2FT_BIN", os.path.join(ROOT, "build", "gpt2-finetune"))


def make_inputs(work):
    shape = os.path.join(work, "shape.json")
    with open(shape, "w") as f:
        json.dump({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 97, "n_positions": 32}, f)
    subprocess.run([BIN, "init", "--config-json", shape, "--output", os.path.join(work, "model"), "--seed", "3"],
                   check=True, capture_output=True)
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, 97, size=23), 200)[:4000]
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    with open(os.path.join(work, "train_000000.bin"), "wb") as f:
        f.write(header.tobytes() + tokens.astype(np.uint16).tobytes())


def config(work, out, steps):
    return {"model": {"init_from": os.path.join(work, "model"), "dropout": 0.1},
            "data": {"train": os.path.join(work, "train_*.bin"), "seq_len": 16, "num_workers": 2},
            "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": steps, "lr": 3e-3,
                      "fused_adamw": "off", "deterministic": True},
            "checkpoint": {"every_steps": 1, "keep_last": 2}, "log": {"every_steps": 5, "progress": "lines"},
            "output_dir": out, "device": "cpu"}


def final_state(out):
    weights = load_file(os.path.join(out, "final", "model.safetensors"))
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        latest = f.read().strip()
    state = load_file(os.path.join(out, "checkpoints", latest, "trainer_state.safetensors"))
    return weights, state


def same(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kills", type=int)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="gpt2ft-kill9-")
    make_inputs(work)
    path = os.path.join(work, "run.json")

    def write(out):
        with open(path, "w") as f:
            json.dump(config(work, out, args.steps), f)

    straight = os.path.join(work, "straight")
    write(straight)
    t_run = time.monotonic()
    subprocess.run([BIN, "--config", path], check=True, capture_output=True)
    t_run = time.monotonic() - t_run  # an uninterrupted run, start-up included
    reference = final_state(straight)

    kills = starts = unusable = rounds = mismatched = leftovers = 0
    out = os.path.join(work, "round0")
    write(out)
    t0 = time.monotonic()
    while kills < args.kills:
        p = subprocess.Popen([BIN, "--config", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        starts += 1
        try:
            # Anywhere in a whole run: start-up, steps, checkpoint writes, the final save.
            _, err = p.communicate(timeout=rng.uniform(0.02, t_run))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            kills += 1
            continue
        if p.returncode != 0:  # it ran to an end by itself, but not a successful one
            unusable += 1
            print(f"restart {starts} failed (exit {p.returncode}): {err.strip().splitlines()[-1:]}", flush=True)
            shutil.rmtree(out)
        else:  # the round is complete: compare with the uninterrupted run
            rounds += 1
            if not all(same(a, b) for a, b in zip(final_state(out), reference)):
                mismatched += 1
                print(f"round {rounds}: final weights or optimizer state differ from the straight run", flush=True)
            leftovers += sum(1 for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".tmp"))
            shutil.rmtree(out)
        out = os.path.join(work, f"round{rounds}")
        write(out)
    # Finish the last round without kills.
    r = subprocess.run([BIN, "--config", path], capture_output=True, text=True)
    if r.returncode != 0:
        unusable += 1
        print(f"final restart failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    else:
        rounds += 1
        mismatched += not all(same(a, b) for a, b in zip(final_state(out), reference))
        leftovers += sum(1 for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".tmp"))
    print(f"kill -9 soak: {kills} SIGKILLs over {starts + 1} starts in {time.monotonic() - t0:.0f} s (an uninterrupted "
          f"run: {t_run:.1f} s); unusable "
          f"resumes: {unusable}; rounds completed: {rounds}, differing from the uninterrupted run: {mismatched}; "
          f"leftover temporary folders: {leftovers}")
    shutil.rmtree(work)
    sys.exit(1 if unusable or mismatched or leftovers else 0)


if __name__ == "__main__":
    main()
