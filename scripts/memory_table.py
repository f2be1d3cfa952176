#!/usr/bin/env python3
"""The planner's table for docs/memory.md: the largest micro batch of gpt2 ... gpt2-xl at
T=1024 on 16/24/40/80 GB GPUs, bf16, with and without activation checkpointing, accumulating (gradients held).

  .venv/bin/python scripts/memory_table.py > table.md
"""
import json
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("GPT2FT_BUILD_DIR", os.path.join(ROOT, "build")), "gpt2-finetune")
PRESETS = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
GPUS = [16, 24, 40, 80]


def plan(preset, gib, checkpointing, chunked_loss=True):
    cfg = {"model": {"preset": preset, "dropout": 0.0, "activation_checkpointing": checkpointing},
           "data": {"train": "unused", "seq_len": 1024},
           "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 4096, "chunked_loss": chunked_loss},
           "amp": {"dtype": "bfloat16"}, "device": "cuda"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    r = subprocess.run([BIN, "plan", "--config", f.name, "--gpu-memory", f"{gib}GiB", "--json"],
                       capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    gib = 1 << 30
    print("| model | fixed (weights + grads + AdamW + bf16 copies + loss workspace) | activations / sequence (none / all "
          "checkpointed) | loss / sequence (chunked; eager) | " + " | ".join(f"{g} GiB: micro (none / all)" for g in GPUS)
          + " | 80 GiB, eager loss: micro (none / all) |")
    print("|---" * (5 + len(GPUS)) + "|")
    for preset in PRESETS:
        rows = {ck: [plan(preset, g, ck) for g in GPUS] for ck in ("none", "all")}
        eager = {ck: plan(preset, GPUS[-1], ck, chunked_loss=False) for ck in ("none", "all")}
        p = rows["none"][0]
        cells = [f"{rows['none'][i]['largest_micro_batch']} / {rows['all'][i]['largest_micro_batch']}" for i in range(len(GPUS))]
        cells.append(f"{eager['none']['largest_micro_batch']} / {eager['all']['largest_micro_batch']}")
        print(f"| {preset} | {p['fixed'] / gib:.2f} GiB | {p['activations_per_sequence_no_checkpointing'] / gib:.2f} / "
              f"{p['activations_per_sequence_all_checkpointed'] / gib:.2f} GiB | {p['logits_per_sequence'] / gib:.3f}; "
              f"{eager['none']['logits_per_sequence'] / gib:.2f} GiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
