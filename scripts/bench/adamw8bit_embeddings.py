#!/usr/bin/env python3
"""8-bit AdamW and a padded vocabulary on real text (issue: chat data).

GPT-2's 50257-row embedding is not a multiple of 256, so 8-bit AdamW keeps its moments in
float32 whatever the rule; padded to 50304 rows (a chat template's tokens) torchao's rule
quantizes them. This trains a ~7M-parameter GPT-2 (4 layers, 128 channels, GPT-2's
vocabulary) from scratch for --steps steps on the Brown corpus and reports the validation
loss of: AdamW at 50304 rows; 8-bit AdamW at 50257 rows; 8-bit AdamW at 50304 rows with the
embeddings' moments in 8-bit (torchao's rule) and in float32 (train.adamw_8bit.embeddings,
the default). Same data, seed and schedule; CPU.

  .venv/bin/python scripts/bench/adamw8bit_embeddings.py [--steps 80]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_bench import BUILD, corpus_arguments, init_model, parse_corpus_arguments, print_table  # noqa: E402


def main():
    ap = corpus_arguments(__doc__)
    ap.add_argument("--steps", type=int, default=80)
    args = parse_corpus_arguments(ap)
    exe = os.path.join(BUILD, "gpt2-finetune")
    work = tempfile.mkdtemp(prefix="gpt2ft-8bit-embeddings-")
    try:
        # The corpus as .jsonl paragraphs, so that 2% of them make a validation split.
        corpus = os.path.join(work, "brown.jsonl")
        with open(args.text, encoding="utf-8") as f, open(corpus, "w", encoding="utf-8") as out:
            for para in f.read().split("\n\n"):
                if para.strip():
                    out.write(json.dumps({"text": para}) + "\n")
        shards = os.path.join(work, "shards")
        subprocess.run([exe, "tokenize", "--tokenizer", args.vocab, "--input", corpus, "--output-dir", shards,
                        "--val-fraction", "0.02", "--no-progress"], check=True, capture_output=True)
        model = init_model(exe, work, args.vocab, n_layer=4, n_head=4, n_embd=128, vocab_size=50257, n_positions=128)
        runs = [("AdamW", 50304, "adamw", "float32"),
                ("8-bit AdamW", 50257, "adamw_8bit", "float32"),
                ("8-bit AdamW, embeddings 8-bit (torchao's rule)", 50304, "adamw_8bit", "8bit"),
                ("8-bit AdamW, embeddings float32 (default)", 50304, "adamw_8bit", "float32")]
        rows = []
        for name, vocab, optimizer, embeddings in runs:
            out = os.path.join(work, f"run_{optimizer}_{vocab}_{embeddings}")
            cfg = {"model": {"init_from": model, "dropout": 0.0, "resize_vocab": vocab},
                   "data": {"train": os.path.join(shards, "train_*.bin"), "val": os.path.join(shards, "val_*.bin"),
                            "seq_len": 128},
                   "train": {"micro_batch_size": 16, "global_batch_size": 16, "max_steps": args.steps, "lr": 2e-3,
                             "min_lr": 2e-4, "warmup_steps": 8, "lr_schedule": "cosine", "optimizer": optimizer,
                             "adamw_8bit": {"embeddings": embeddings}, "seed": 1},
                   "eval": {"every_steps": args.steps, "max_sequences": 400},
                   "output_dir": out, "device": "cpu", "log": {"every_steps": args.steps, "progress": "lines"}}
            path = out + ".json"
            with open(path, "w") as f:
                json.dump(cfg, f)
            subprocess.run([exe, "train", "--config", path], check=True, capture_output=True)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                val = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
            rows.append((name, vocab, val[-1]))
            print(f"{name}, {vocab} rows: val loss {val[-1]:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.steps} steps of 16 x 128 tokens, ~7M parameters, Brown corpus\n")
    print_table(("optimizer", "vocabulary", "val loss"), [(n, f"{v} rows", f"{loss:.3f}") for n, v, loss in rows])


if __name__ == "__main__":
    main()
