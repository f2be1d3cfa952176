#!/usr/bin/env python3
"""DPO's peak tensor memory against supervised fine-tuning on the same rows (issue: DPO).

Builds preference pairs from the Brown corpus (a sentence's first three words as the prompt, the
rest as chosen, the rest shuffled as rejected), and the same sequences as prompt/completion
pairs. Then it trains a ~16M-parameter GPT-2 (4 layers, 256 channels, GPT-2's vocabulary) for 3
steps of 16 rows of 32 positions each: SFT at micro batch 16, DPO at 8 pairs (16 rows) with each
dpo.reference, in full and with LoRA (rank 8 on c_attn, c_fc, c_proj), in float32 and bfloat16
autocast. It reports the counting CPU allocator's peak (cpu_peak_allocated_gb), DPO's ratio to
SFT, and what `plan` predicts for the same config.

  .venv/bin/python scripts/bench/dpo_memory.py
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_bench import BUILD, corpus_arguments, init_model, parse_corpus_arguments, print_table  # noqa: E402


def write_data(text, work, n=400):
    rng = random.Random(0)
    with open(text, encoding="utf-8") as f:
        sentences = [s.strip() for s in f if 8 <= len(s.split()) <= 16]
    rng.shuffle(sentences)
    pref, sft = os.path.join(work, "pref.jsonl"), os.path.join(work, "sft.jsonl")
    with open(pref, "w") as p, open(sft, "w") as s:
        for sentence in sentences[:n]:
            words = sentence.split()
            rest = words[3:]
            shuffled = rest[:]
            while shuffled == rest:
                rng.shuffle(shuffled)
            prompt, chosen, rejected = " ".join(words[:3]), " " + " ".join(rest), " " + " ".join(shuffled)
            p.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            for completion in (chosen, rejected):
                s.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return pref, sft


def main():
    args = parse_corpus_arguments(corpus_arguments(__doc__))
    exe = os.path.join(BUILD, "gpt2-finetune")
    work = tempfile.mkdtemp(prefix="gpt2ft-dpo-memory-")
    try:
        pref, sft = write_data(args.text, work)
        fields = {"pref": ["--chosen-field", "chosen", "--rejected-field", "rejected"],
                  "sft": ["--completion-field", "completion"]}
        for name, path in (("pref", pref), ("sft", sft)):
            subprocess.run([exe, "tokenize", "--tokenizer", args.vocab, "--input", path, "--output-dir",
                            os.path.join(work, name), "--prompt-field", "prompt", *fields[name], "--val-fraction", "0",
                            "--no-progress"], check=True, capture_output=True)
        model = init_model(exe, work, args.vocab, n_layer=4, n_head=4, n_embd=256, vocab_size=50257, n_positions=64)

        def peak(name, reference, lora, amp):
            out = os.path.join(work, f"run_{name}_{reference}_{lora}_{amp}")
            dpo = name != "SFT"
            cfg = {"model": {"init_from": model},
                   "data": {"train": os.path.join(work, "pref" if dpo else "sft", "train_*.bin"), "seq_len": 32,
                            "num_workers": 1},
                   "train": {"micro_batch_size": 8 if dpo else 16, "global_batch_size": 8 if dpo else 16,
                             "max_steps": 3},
                   "amp": {"dtype": amp}, "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out,
                   "device": "cpu"}
            if dpo:
                cfg["train"]["objective"] = "dpo"
                cfg["dpo"] = {"reference": reference}
            if lora:
                cfg["model"]["lora"] = {"rank": 8, "alpha": 16, "targets": ["c_attn", "c_fc", "c_proj"]}
            path = out + ".json"
            with open(path, "w") as f:
                json.dump(cfg, f)
            plan = subprocess.run([exe, "plan", "--config", path, "--json"], check=True, capture_output=True, text=True)
            predicted = json.loads(plan.stdout.strip().splitlines()[-1])["predicted_peak"] / 1e6
            subprocess.run([exe, "train", "--config", path], check=True, capture_output=True)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                measured = [r for r in map(json.loads, f) if "loss" in r][-1]["cpu_peak_allocated_gb"] * 1e3  # MB
            return measured, predicted

        rows = []
        for lora in (False, True):
            for amp in ("none", "bfloat16"):
                base, planned = peak("SFT", "-", lora, amp)
                rows.append(("LoRA" if lora else "full", amp, "SFT", f"{base:.1f}", "1.00", f"{planned:.1f}"))
                for reference in (("precomputed", "base", "model") if lora else ("precomputed", "model")):
                    mb, planned = peak("DPO", reference, lora, amp)
                    rows.append(("LoRA" if lora else "full", amp, f"DPO {reference}", f"{mb:.1f}", f"{mb / base:.2f}",
                                 f"{planned:.1f} ({100 * (planned / mb - 1):+.0f}%)"))
                    print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n3 steps of 16 rows x 32 positions, ~16M parameters (64 MB in float32), CPU counting allocator\n")
    print_table(("training", "autocast", "objective", "peak MB", "ratio to SFT", "plan's prediction MB"), rows)


if __name__ == "__main__":
    main()
