#!/usr/bin/env python3
"""What fitting a big model under a memory cap costs: gpt2-finetune on one model and batch,
(1) as configured, without a cap (the reference run), (2) with activation checkpointing on
all blocks, and (3) with the levers `gpt2-finetune plan` recommends for the cap (checkpointing
+ optimizer offload for gpt2-xl at 24 GiB) under cuda.memory_limit. Reports each run's median
step time and tokens/s over the timed steps (after warm-up), the ratios to the reference run,
the peak CUDA memory, and the host AdamW step for the model's parameter count
(host_adamw_bench.py's kernel). All in one invocation, so the ratios compare like with like.

  # GPU mode (the issue's target): gpt2-xl, T=1024, bf16, micro 4 x accumulation 4, 24 GiB cap
  python scripts/bench/offload_bench.py --mode gpu
  # CPU mode (any machine, a dry run of the same path): a small model, fp32, no cap
  .venv/bin/python scripts/bench/offload_bench.py --mode cpu
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_bench import AMP_NAMES, BIN, ROOT, make_data, make_model  # noqa: E402


def run(work, name, model, shard, args, settings):
    out = os.path.join(work, name)
    cfg = {"model": {"init_from": model, "dropout": 0.0},
           "data": {"train": shard, "seq_len": args.seq_len, "shuffle": False, "num_workers": 2},
           "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro * args.accumulation,
                     "max_steps": args.warmup + args.steps, "lr": 1e-5, "warmup_steps": 0, "lr_schedule": "constant"},
           "amp": {"dtype": AMP_NAMES[args.dtype]}, "checkpoint": {"resume": "none", "at_end": False},
           "log": {"every_steps": 1, "progress": "lines"}, "output_dir": out, "device": args.device}
    path = out + ".json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    cmd = [BIN, "--config", path]
    for s in settings:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    step_s = statistics.median(r_["step_ms"] / 1000 for r_ in rows[args.warmup:])
    report = re.search(r"optimizer offload: .*", r.stderr)
    return {"settings": settings, "median_step_s": step_s,
            "tokens_per_s": args.micro * args.accumulation * args.seq_len / step_s,
            "peak_gb": max((r_.get("cuda_peak_allocated_gb", 0) for r_ in rows), default=None),
            "offload_report": report.group(0) if report else None}


def recommended_levers(work, model, shard, args):
    """The settings `plan` recommends to fit args.cap; without a cap (CPU mode), the levers
    it recommends for gpt2-xl at 24 GiB, so the same path runs."""
    if not args.cap:
        return ["model.activation_checkpointing=all", "train.optimizer_offload=cpu"]
    path = os.path.join(work, "plan.json")
    with open(path, "w") as f:
        json.dump({"model": {"init_from": model, "dropout": 0.0},
                   "data": {"train": shard, "seq_len": args.seq_len},
                   "train": {"micro_batch_size": args.micro, "global_batch_size": args.micro * args.accumulation,
                             "max_steps": 1},
                   "amp": {"dtype": AMP_NAMES[args.dtype]}, "device": args.device}, f)
    r = subprocess.run([BIN, "plan", "--config", path, "--gpu-memory", args.cap, "--json"],
                       capture_output=True, text=True, check=True)
    advice = json.loads(r.stdout)["advice"]
    print(f"plan at {args.cap}: recommended {advice['recommended']['name']} "
          f"(predicted peak {advice['recommended']['peak'] / 2**30:.2f} GiB)", flush=True)
    return advice["recommended"]["settings"]


def host_adamw_ms(params, threads):
    """Median ms of torch's fused AdamW over `params` float32 parameters on the host, in
    25 MiB buckets (as host_adamw_bench.py)."""
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_adamw_bench.py"),
                        "--params", str(params), "--threads", str(threads), "--steps", "3"],
                       capture_output=True, text=True, check=True)
    print(r.stdout.strip(), flush=True)
    match = re.search(r": (\d+) ms a step", r.stdout)
    return float(match.group(1)) if match else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--preset", default=None, help="default: gpt2-xl on gpu, a small model on cpu")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--dtype", default=None, choices=list(AMP_NAMES))
    ap.add_argument("--cap", default=None, help="cuda.memory_limit for the run with the levers (gpu default 24GiB)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-host-adamw", action="store_true")
    ap.add_argument("--runs", default="configured,checkpointing,levers",
                    help="which runs, comma-separated, of: configured (the reference), checkpointing, levers")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = args.mode == "gpu"
    args.device = "cuda" if gpu else "cpu"
    args.preset = args.preset or ("gpt2-xl" if gpu else None)
    args.seq_len = args.seq_len or (1024 if gpu else 128)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.cap = args.cap or ("24GiB" if gpu else None)
    args.out = args.out or os.path.join(ROOT, "docs", f"bench-offload-{args.mode}.json")
    if gpu and not torch.cuda.is_available():
        sys.exit("--mode gpu needs CUDA")

    work = tempfile.mkdtemp(prefix="gpt2ft-offload-bench-")
    model_dir, vocab = make_model(work, args)
    steps = args.warmup + args.steps
    shard, _ = make_data(work, vocab, steps * args.micro * args.accumulation * args.seq_len + args.seq_len + 1)
    levers = recommended_levers(work, model_dir, shard, args)
    cap = [f"cuda.memory_limit={args.cap}"] if args.cap else []
    runs = {}
    wanted = set(args.runs.split(","))
    for key, name, settings in (("configured", "as configured", []),
                                ("checkpointing", "checkpointing all", ["model.activation_checkpointing=all"]),
                                ("levers", "recommended levers" + (f", capped at {args.cap}" if args.cap else ""),
                                 levers + cap)):
        if key not in wanted:
            continue
        runs[name] = run(work, name.replace(" ", "_").replace(",", ""), model_dir, shard, args, settings)
        print(json.dumps({name: runs[name]}), flush=True)
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    adamw = None if args.skip_host_adamw else host_adamw_ms(n_params, os.cpu_count())

    meta = {"mode": args.mode, "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "model": args.preset or "4 layers, 4 heads, 256 channels, vocab 4096", "parameters": n_params,
            "seq_len": args.seq_len, "micro": args.micro, "accumulation": args.accumulation, "dtype": args.dtype,
            "warmup": args.warmup, "timed_steps": args.steps}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "runs": runs, "host_adamw_ms": adamw}, f, indent=1)
    ref = next(iter(runs.values()))
    print(f"\n{args.mode.upper()}: {meta['model']} ({n_params / 1e6:,.0f}M parameters), T={args.seq_len}, {args.dtype}, "
          f"micro {args.micro} x accumulation {args.accumulation}, {meta['device']}, {meta['cpus']} cores, "
          f"torch {meta['torch']}, median of {args.steps} steps after {args.warmup} warm-up, {meta['date']}\n")
    print("| run | settings | median step s | tokens/s | vs as configured |" + (" peak GB |" if gpu else ""))
    print("|---|---|---|---|---|" + ("---|" if gpu else ""))
    for name, r in runs.items():
        line = (f"| {name} | {' '.join(r['settings']) or '-'} | {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
        if gpu:
            line += f" {r['peak_gb']:.2f} |"
        print(line)
    for r in runs.values():
        if r["offload_report"]:
            print(r["offload_report"])
    if adamw is not None:
        print(f"host AdamW step for {n_params / 1e6:,.0f}M parameters on {os.cpu_count()} cores: {adamw:.0f} ms")


if __name__ == "__main__":
    main()
