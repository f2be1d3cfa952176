#!/usr/bin/env python3
"""Training-step benchmark: gpt2-finetune against a plain PyTorch eager loop and Hugging Face
Trainer on the same model folder, data, micro batch, precision and checkpointing, in one
invocation. Reports the median step's tokens/s over the timed steps (after warm-up), peak
CUDA memory on GPUs, and the ratios; writes JSON and a markdown table.

  # CPU mode (any machine): a small model, fp32 and bf16
  .venv/bin/python scripts/bench/train_bench.py --mode cpu
  # GPU mode (on the GPU machine): gpt2 124M at T=1024
  .venv/bin/python scripts/bench/train_bench.py --mode gpu --preset gpt2 --dtype bf16 --micro 8 16 32
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("GPT2FT_BUILD_DIR", os.path.join(ROOT, "build")), "gpt2-finetune")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_NAMES = {"fp32": "none", "bf16": "bfloat16", "fp16": "float16"}


def run_ours(cmd):
    """Runs one gpt2-finetune command; on failure, prints the tail of its output and stops."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write((r.stdout + r.stderr)[-4000:])
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}")
    return r


def make_model(work, args):
    folder = os.path.join(work, "model")
    if args.preset:
        cmd = [BIN, "init", "--preset", args.preset, "--output", folder]
    elif args.shape:
        cmd = [BIN, "init", "--config-json", args.shape, "--output", folder]
    else:
        cfg = os.path.join(work, "shape.json")
        with open(cfg, "w") as f:
            json.dump({"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 4096, "n_positions": 512}, f)
        cmd = [BIN, "init", "--config-json", cfg, "--output", folder]
    run_ours(cmd)
    with open(os.path.join(folder, "config.json")) as f:
        return folder, json.load(f)["vocab_size"]


def make_data(work, vocab, tokens):
    rng = np.random.default_rng(0)
    data = rng.integers(0, vocab, size=tokens, dtype=np.int64)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, tokens]
    path = os.path.join(work, "train_000000.bin")
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(data.astype(np.uint16).tobytes())
    return path, data


def windows(data, T, count):
    return [data[k * T: k * T + T + 1] for k in range(count)]


def bench_ours(work, model, shard, args, micro, dtype, ckpt, chunked_loss=True, deterministic=False):
    out = os.path.join(work, f"ours_{micro}_{dtype}_{ckpt}_{chunked_loss}_{deterministic}")
    cfg = {"model": {"init_from": model, "dropout": 0.0, "activation_checkpointing": "all" if ckpt else "none"},
           "data": {"train": shard, "seq_len": args.seq_len, "shuffle": False, "num_workers": 2},
           "train": {"micro_batch_size": micro, "global_batch_size": micro, "max_steps": args.warmup + args.steps,
                     "lr": 1e-4, "warmup_steps": 0, "lr_schedule": "constant",
                     "fused_adamw": os.environ.get("GPT2FT_BENCH_FUSED", "auto"), "chunked_loss": chunked_loss,
                     "deterministic": deterministic},
           "amp": {"dtype": AMP_NAMES[dtype]}, "checkpoint": {"resume": "none", "at_end": False},
           "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out, "device": args.device}
    path = out + ".json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    run_ours([BIN, "--config", path])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    times = [r["step_ms"] / 1000 for r in rows[args.warmup:]]
    mem = rows[-1].get("cuda_peak_allocated_gb")
    return statistics.median(times), mem


def bench_eager(model_dir, data, args, micro, dtype, ckpt):
    from transformers import GPT2LMHeadModel
    dev = torch.device(args.device)
    model = GPT2LMHeadModel.from_pretrained(model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            attn_implementation="sdpa").to(dev)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type) if dtype == "fp16" else None
    T = args.seq_len
    batches = windows(data, T, (args.warmup + args.steps) * micro)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = torch.tensor(np.stack(batches[step * micro:(step + 1) * micro])).to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None
    return statistics.median(times[args.warmup:]), mem


def bench_hf_trainer(work, model_dir, data, args, micro, dtype, ckpt):
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    T = args.seq_len
    batches = windows(data, T, (args.warmup + args.steps) * micro)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            ids = torch.tensor(batches[i][:T])
            return {"input_ids": ids, "labels": ids}

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    model = GPT2LMHeadModel.from_pretrained(model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            attn_implementation="sdpa")
    targs = TrainingArguments(output_dir=os.path.join(work, "hf"), per_device_train_batch_size=micro,
                              gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=1e-4,
                              weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="constant",
                              bf16=dtype == "bf16", fp16=dtype == "fp16", gradient_checkpointing=ckpt,
                              logging_steps=10 ** 9, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                              dataloader_num_workers=0, optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch",
                              disable_tqdm=True)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Timer()]).train()
    mem = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None
    return statistics.median(times[args.warmup:]), mem


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--preset", default=None, help="a GPT-2 preset (default: a small model on cpu, gpt2 on gpu)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro", type=int, nargs="+", default=None)
    ap.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    ap.add_argument("--checkpointing", nargs="+", type=int, default=[0], help="0 and/or 1")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--also-eager-loss", action="store_true",
                    help="also run ours with train.chunked_loss false (the before/after of the chunked loss)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", help="a model shape JSON (e.g. configs/quickstart-model.json) instead of the default")
    ap.add_argument("--also-deterministic", action="store_true",
                    help="also time ours with train.deterministic (MKL's reproducible branch on the CPU)")
    args = ap.parse_args()
    gpu = args.mode == "gpu"
    args.device = "cuda" if gpu else "cpu"
    args.preset = args.preset or ("gpt2" if gpu else None)
    args.seq_len = args.seq_len or (1024 if gpu else 256)
    args.micro = args.micro or ([8, 16] if gpu else [8])
    args.dtype = args.dtype or (["bf16"] if gpu else ["fp32", "bf16"])
    args.out = args.out or os.path.join(ROOT, "docs", f"bench-train-{args.mode}.json")
    if gpu and not torch.cuda.is_available():
        sys.exit("--mode gpu needs CUDA")

    work = tempfile.mkdtemp(prefix="gpt2ft-bench-")
    model_dir, vocab = make_model(work, args)
    shard, data = make_data(work, vocab, (args.warmup + args.steps) * max(args.micro) * args.seq_len + args.seq_len + 1)
    rows = []
    for dtype in args.dtype:
        for micro in args.micro:
            for ckpt in map(bool, args.checkpointing):
                tokens = micro * args.seq_len
                row = {"dtype": dtype, "micro": micro, "checkpointing": ckpt}
                for name, fn in (("gpt2-finetune", lambda: bench_ours(work, model_dir, shard, args, micro, dtype, ckpt)),
                                 ("pytorch-eager", lambda: bench_eager(model_dir, data, args, micro, dtype, ckpt)),
                                 ("hf-trainer", lambda: bench_hf_trainer(work, model_dir, data, args, micro, dtype, ckpt)),
                                 ("gpt2-finetune-eager-loss",
                                  lambda: bench_ours(work, model_dir, shard, args, micro, dtype, ckpt, False)),
                                 ("gpt2-finetune-deterministic",
                                  lambda: bench_ours(work, model_dir, shard, args, micro, dtype, ckpt, True, True))):
                    if ((name == "hf-trainer" and args.skip_hf) or (name.endswith("eager-loss") and not args.also_eager_loss)
                            or (name.endswith("deterministic") and not args.also_deterministic)):
                        continue
                    t, mem = fn()
                    row[name] = {"median_step_s": t, "tokens_per_s": tokens / t, "peak_gb": mem}
                rows.append(row)
                print(json.dumps(row), flush=True)

    meta = {"mode": args.mode, "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "model": args.preset or args.shape or "4 layers, 4 heads, 256 channels, vocab 4096", "seq_len": args.seq_len,
            "warmup": args.warmup, "timed_steps": args.steps}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta['mode'].upper()}: {meta['model']}, T={meta['seq_len']}, {meta['device']}, torch {meta['torch']}, "
          f"median of {args.steps} steps after {args.warmup} warm-up, {meta['date']}\n")
    print("| dtype | micro | ckpt | gpt2-finetune tok/s | PyTorch eager tok/s | HF Trainer tok/s | ours / eager | ours / HF |"
          + (" ours / eager / HF peak GB |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        ours, eager, hf = r["gpt2-finetune"], r["pytorch-eager"], r.get("hf-trainer")
        line = (f"| {r['dtype']} | {r['micro']} | {'on' if r['checkpointing'] else 'off'} | {ours['tokens_per_s']:,.0f} | "
                f"{eager['tokens_per_s']:,.0f} | {hf['tokens_per_s']:,.0f} | " if hf else
                f"| {r['dtype']} | {r['micro']} | {'on' if r['checkpointing'] else 'off'} | {ours['tokens_per_s']:,.0f} | "
                f"{eager['tokens_per_s']:,.0f} | - | ")
        line += f"{ours['tokens_per_s'] / eager['tokens_per_s']:.2f}x | "
        line += f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x |" if hf else "- |"
        if gpu:
            line += f" {ours['peak_gb']:.2f} / {eager['peak_gb']:.2f} / {hf['peak_gb'] if hf else 0:.2f} |"
        print(line)
    for r in rows:
        if "gpt2-finetune-deterministic" in r:
            a, d, e = r["gpt2-finetune"], r["gpt2-finetune-deterministic"], r["pytorch-eager"]
            print(f"train.deterministic {r['dtype']} micro {r['micro']}: off {a['tokens_per_s']:,.0f} tok/s "
                  f"({a['tokens_per_s'] / e['tokens_per_s']:.2f}x eager), on {d['tokens_per_s']:,.0f} tok/s "
                  f"({d['tokens_per_s'] / e['tokens_per_s']:.2f}x eager); on costs {a['tokens_per_s'] / d['tokens_per_s']:.2f}x")
    for r in rows:
        if "gpt2-finetune-eager-loss" in r:
            a, b = r["gpt2-finetune"], r["gpt2-finetune-eager-loss"]
            mem = (f"; peak {a['peak_gb']:.2f} vs {b['peak_gb']:.2f} GB" if gpu else "")
            print(f"chunked loss {r['dtype']} micro {r['micro']}: {a['tokens_per_s']:,.0f} vs eager loss "
                  f"{b['tokens_per_s']:,.0f} tok/s ({a['tokens_per_s'] / b['tokens_per_s']:.2f}x){mem}")


if __name__ == "__main__":
    main()
