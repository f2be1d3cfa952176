#!/usr/bin/env python3
"""Instruction data benchmark: the step time of gpt2-finetune on packed prompt/completion
documents (each attending only to itself through an explicit mask, the loss on completions)
against the same tokens trained as plain text (causal attention, every token a target), in one
invocation, runs interleaved. Reports median step times over the timed steps and the ratio.

  .venv/bin/python scripts/bench/instruction_bench.py            # CPU, small model, fp32 and bf16
  .venv/bin/python scripts/bench/instruction_bench.py --device cuda --seq-len 1024 --micro 16 --attention mask varlen

Every run's losses must be finite (a NaN from an attention kernel fails the benchmark).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("GPT2FT_BUILD_DIR", os.path.join(ROOT, "build")), "gpt2-finetune")
AMP = {"fp32": "none", "bf16": "bfloat16"}
MASK64 = (1 << 64) - 1


def checksum(data: bytes) -> int:
    """The 64-bit checksum of core/checksum.h (xor-multiply chain, then an avalanche)."""
    h = (0xCBF29CE484222325 ^ len(data)) & MASK64
    words = len(data) // 8
    for w in np.frombuffer(data[:words * 8], dtype="<u8").tolist():
        h = ((h ^ w) * 0x9E3779B97F4A7C15) & MASK64
    for b in data[words * 8:]:
        h = ((h ^ b) * 0x9E3779B97F4A7C15) & MASK64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    return h ^ (h >> 33)


def document_shard_bytes(tokens, starts, targets, magic=20261201, version=2):
    """data/shard.h's document shard: header, uint16 tokens, padding, starts, target bits (a
    preference shard with magic 20261206, version 1: the same layout and checksum)."""
    sections = np.asarray(starts, dtype="<u4").tobytes() + np.packbits(np.asarray(targets, dtype=bool),
                                                                         bitorder="little").tobytes()
    header = np.zeros(256, dtype="<i4")
    header[:5] = [magic, version, len(tokens), 2, len(starts)]
    s = (checksum(header[2:5].tobytes()) * 0x9E3779B97F4A7C15 + checksum(sections)) & MASK64  # version 2
    header[5:7] = np.array([s & 0xFFFFFFFF, s >> 32], dtype="<u4").view("<i4")
    body = np.asarray(tokens, dtype="<u2").tobytes()
    body += b"\0" * (-len(body) % 4)
    return header.tobytes() + body + sections


def write_document_shard(path, tokens, starts, targets, **kind):
    with open(path, "wb") as f:
        f.write(document_shard_bytes(tokens, starts, targets, **kind))


def write_plain_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def make_data(work, vocab, T, total_tokens, seed=0):
    """Documents eot + prompt + completion + eot of 1/8 to 1 times T+1 tokens; the same tokens
    as one plain text shard."""
    rng = np.random.default_rng(seed)
    tokens, starts, targets = [], [], []
    eot = vocab - 1
    while len(tokens) < total_tokens:
        length = int(rng.integers((T + 1) // 8, T + 2))
        prompt = int(rng.integers(0, length - 2))
        starts.append(len(tokens))
        body = rng.integers(0, vocab - 1, size=length - 2).tolist()
        tokens += [eot] + body + [eot]
        targets += [False] * (1 + prompt) + [True] * (length - 1 - prompt)
    os.makedirs(os.path.join(work, "docs"), exist_ok=True)
    os.makedirs(os.path.join(work, "plain"), exist_ok=True)
    write_document_shard(os.path.join(work, "docs", "train_000000.bin"), tokens, starts, targets)
    write_plain_shard(os.path.join(work, "plain", "train_000000.bin"), tokens)
    return len(tokens), len(starts)


def run(work, model, shards, args, dtype, tag, attention="mask"):
    out = os.path.join(work, f"run_{tag}")
    cfg = {"model": {"init_from": model, "dropout": 0.0},
           "data": {"train": shards, "seq_len": args.seq_len, "shuffle": True, "num_workers": 2},
           "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro,
                     "max_steps": args.warmup + args.steps, "lr": 1e-4, "lr_schedule": "constant"},
           "amp": {"dtype": AMP[dtype]}, "checkpoint": {"resume": "none", "at_end": False},
           "attention": {"packed": attention},
           "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out, "device": args.device}
    with open(out + ".json", "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([BIN, "--config", out + ".json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    for line in r.stderr.splitlines():
        if "attention on" in line and tag.endswith("_0"):
            print(f"  {tag}: {line.split('] ')[-1]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    bad = [row["step"] for row in rows if not isinstance(row["loss"], (int, float)) or row["loss"] != row["loss"]]
    if bad:
        raise SystemExit(f"{tag}: non-finite loss at steps {bad}")
    return [row["step_ms"] for row in rows[args.warmup:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each kind")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--attention", nargs="+", default=["mask"], choices=["mask", "varlen"],
                    help="attention.packed paths to time for the packed documents")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpt2ft-instruction-bench-") as work:
        shape = os.path.join(work, "shape.json")
        with open(shape, "w") as f:
            json.dump({"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 4096,
                       "n_positions": max(512, args.seq_len)}, f)
        model = os.path.join(work, "model")
        subprocess.run([BIN, "init", "--config-json", shape, "--output", model], check=True, capture_output=True)
        n, docs = make_data(work, 4096, args.seq_len, 200 * args.seq_len)
        print(f"{n} tokens in {docs} documents; T={args.seq_len}, micro batch {args.micro}, device {args.device}")
        results = {}
        for dtype in args.dtypes:
            kinds = ["plain"] + [f"documents_{a}" for a in args.attention]
            times = {k: [] for k in kinds}
            for repeat in range(args.repeats):
                for kind in kinds:
                    shards = os.path.join(work, "plain" if kind == "plain" else "docs", "train_*.bin")
                    attention = kind.split("_")[1] if kind != "plain" else "mask"
                    times[kind] += run(work, model, shards, args, dtype, f"{kind}_{dtype}_{repeat}", attention)
            med = {k: statistics.median(v) for k, v in times.items()}
            results[dtype] = {f"{k}_ms": v for k, v in med.items()}
            for kind in kinds[1:]:
                results[dtype][f"{kind}_ratio"] = med[kind] / med["plain"]
                print(f"{dtype}: plain text {med['plain']:.1f} ms/step, packed documents ({kind.split('_')[1]}) "
                      f"{med[kind]:.1f} ms/step (ratio {med[kind] / med['plain']:.3f}; median of "
                      f"{len(times['plain'])} steps each)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
