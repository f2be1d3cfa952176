#!/usr/bin/env python3
"""The planner against the CPU counting allocator (memory/counting_allocator.h): for each
configuration, `plan --measure --json` runs 3 real training steps on the CPU and reports the
peak tensor bytes it counted (and each phase's), beside the planner's prediction for the CPU.
Prints a markdown table: predicted, measured, error, and the phase where the peak fell.

  .venv/bin/python scripts/bench/memory_rehearsal.py                      # small model, the grid
  .venv/bin/python scripts/bench/memory_rehearsal.py --preset gpt2 --seq-len 1024 --grid main
  .venv/bin/python scripts/bench/memory_rehearsal.py --overhead       # what the counting costs a step

--overhead trains the small model (T=128, micro 8, 20 steps) with the counting allocator and
without it (GPT2FT_BENCH_UNCOUNTED=1), runs interleaved, and reports the median step times.
"""
import statistics
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from instruction_bench import write_document_shard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("GPT2FT_BUILD_DIR", os.path.join(ROOT, "build")), "gpt2-finetune")

# name -> config overrides (--set), over the base: fp32, no checkpointing, AdamW, micro = global.
GRIDS = {
    "main": [
        ("plain", []),
        ("checkpointing all", ["model.activation_checkpointing=all"]),
        ("bf16 autocast", ["amp.dtype=bfloat16"]),
        ("8-bit AdamW", ["train.optimizer=adamw_8bit"]),
        ("LoRA r=8", ["model.lora.rank=8"]),
        ("frozen embeddings", ["model.freeze_embeddings=true"]),
    ],
    "small": [
        ("plain", []),
        ("checkpointing all", ["model.activation_checkpointing=all"]),
        ("checkpointing every 2nd", ["model.activation_checkpointing=2"]),
        ("bf16 autocast", ["amp.dtype=bfloat16"]),
        ("accumulation x4", ["train.global_batch_size=4*MICRO"]),
        ("unfused AdamW", ["train.fused_adamw=off"]),
        ("8-bit AdamW", ["train.optimizer=adamw_8bit"]),
        ("offload", ["train.optimizer_offload=cpu"]),
        ("LoRA r=8", ["model.lora.rank=8"]),
        ("LoRA r=8, bf16 base", ["model.lora.rank=8", "model.lora.base_dtype=bfloat16", "amp.dtype=bfloat16"]),
        ("frozen embeddings + 2 blocks", ["model.freeze_embeddings=true", "model.freeze_blocks=2"]),
        ("dropout 0.1", ["model.dropout=0.1"]),
        ("packed documents", ["PACKED"]),
        ("packed documents, bf16, checkpointing every 2nd", ["PACKED", "amp.dtype=bfloat16",
                                                             "model.activation_checkpointing=2"]),
    ],
}


def write_shard(path, vocab, tokens, seed=0):
    rng = np.random.default_rng(seed)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, tokens]
    with open(path, "wb") as f:
        f.write(header.tobytes() + rng.integers(0, vocab, size=tokens).astype(np.uint16).tobytes())


def write_documents(folder, vocab, T, seed=0):
    """A document shard (data/shard.h) of random documents up to T tokens, 60% of them targets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, T, size=64 * T // 32)
    tokens = rng.integers(0, vocab - 1, size=int(lengths.sum()))
    os.makedirs(folder, exist_ok=True)
    write_document_shard(os.path.join(folder, "train_000000.bin"), tokens,
                         np.concatenate([[0], np.cumsum(lengths)[:-1]]), rng.random(tokens.size) < 0.6)
    return os.path.join(folder, "train_*.bin")


def measure(config, micro, sets, documents=None):
    sets = [s.replace("4*MICRO", str(4 * micro)) for s in sets]
    if "PACKED" in sets:
        sets = [s for s in sets if s != "PACKED"] + [f"data.train={documents}", "data.packing=documents"]
    args = [BIN, "plan", "--config", config, "--measure", "--json", "--set", f"train.micro_batch_size={micro}"]
    if not any(s.startswith("train.global_batch_size") for s in sets):
        args += ["--set", f"train.global_batch_size={micro}"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"plan --measure failed for {sets}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def overhead(work, config, repeats=3, steps=20):
    times = {"counted": [], "uncounted": []}
    for repeat in range(repeats):
        for kind in times:
            out = os.path.join(work, f"overhead_{kind}_{repeat}")
            env = dict(os.environ)
            if kind == "uncounted":
                env["GPT2FT_BENCH_UNCOUNTED"] = "1"
            r = subprocess.run([BIN, "--config", config, "--set", f"output_dir={out}", "--set", f"train.max_steps={steps}",
                                "--set", "train.micro_batch_size=8", "--set", "train.global_batch_size=8",
                                "--set", "checkpoint.at_end=false", "--set", "log.every_steps=1",
                                "--set", "log.progress=lines"], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                sys.stderr.write(r.stderr[-3000:])
                raise SystemExit("training failed")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if '"step_ms"' in line]
            times[kind] += [row["step_ms"] for row in rows[3:]]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"step time, median of {len(times['counted'])} steps each: counted {med['counted']:.2f} ms, uncounted "
          f"{med['uncounted']:.2f} ms, ratio {med['counted'] / med['uncounted']:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="a model preset (default: a 4-layer, 256-wide model)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="small")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--overhead", action="store_true", help="measure the counting's cost instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpt2ft-memory-") as work:
        if args.preset:
            model = {"preset": args.preset, "dropout": 0.0}
            vocab = 50257
        else:
            shape = os.path.join(work, "shape.json")
            with open(shape, "w") as f:
                json.dump({"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 4096,
                           "n_positions": max(256, args.seq_len)}, f)
            folder = os.path.join(work, "model")
            subprocess.run([BIN, "init", "--config-json", shape, "--output", folder], check=True, capture_output=True)
            model = {"init_from": folder, "dropout": 0.0}
            vocab = 4096
        write_shard(os.path.join(work, "train_000000.bin"), vocab, 64 * (args.seq_len + 1) + 1)
        documents = write_documents(os.path.join(work, "docs"), vocab, args.seq_len)
        config = os.path.join(work, "run.json")
        with open(config, "w") as f:
            json.dump({"model": model, "data": {"train": os.path.join(work, "train_*.bin"), "seq_len": args.seq_len,
                                                "num_workers": 1},
                       "train": {"max_steps": 3}, "device": "cpu", "log": {"tensorboard": False}}, f)
        if args.overhead:
            overhead(work, config)
            return
        out = []
        print(f"| configuration | micro | predicted MiB | measured MiB | error | peak phase |")
        print("|---|---|---|---|---|---|")
        for name, sets in GRIDS[args.grid]:
            for micro in args.micro:
                r = measure(config, micro, sets, documents)
                predicted, measured = r["predicted_peak"], r["measured_peak_allocated"]
                phases = r.get("measured_peak_by_phase", {})
                top = max(phases, key=phases.get) if phases else "-"
                err = 100.0 * (predicted - measured) / measured
                print(f"| {name} | {micro} | {predicted / 2**20:.1f} | {measured / 2**20:.1f} | {err:+.1f}% | {top} |",
                      flush=True)
                out.append({"configuration": name, "micro": micro, "predicted": predicted, "measured": measured,
                            "error_pct": err, "phases": phases})
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
