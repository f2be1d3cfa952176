#!/usr/bin/env python3
"""Render a run's metrics.jsonl to a PNG: train/val loss, learning rate, throughput, memory
(the GPU's, or on the CPU the counting allocator's peaks), and for a DPO run its rewards and
reward accuracies (train and val).

  .venv/bin/python scripts/plot_metrics.py runs/NAME/metrics.jsonl [-o out.png]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics")
    ap.add_argument("-o", "--output", help="PNG path (default: beside metrics.jsonl)")
    args = ap.parse_args()
    rows = []
    with open(args.metrics) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{args.metrics}:{n}: not valid JSON ({e})")
    # A resumed run logs the steps after its checkpoint again: the later row of a step wins (as
    # TensorBoard shows it).
    def last_per_step(key):
        by_step = {r["step"]: r for r in rows if key in r}
        return [by_step[s] for s in sorted(by_step)]

    train = last_per_step("loss")
    val = last_per_step("val_loss")
    if not train:
        raise SystemExit(f"{args.metrics}: no training rows")
    dpo = any("rewards/accuracies" in r for r in train)
    fig, axes = plt.subplots(3 if dpo else 2, 2, figsize=(11, 10.5 if dpo else 7))
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
        best = min(val, key=lambda r: r["val_loss"])
        ax.plot([best["step"]], [best["val_loss"]], "*", markersize=16, color="gold", markeredgecolor="black",
                label=f"best val {best['val_loss']:.4f} (step {best['step']})")
    for r in rows:
        if "early_stop" in r:
            ax.axvline(r["step"], color="grey", linestyle="--", label=f"early stop (step {r['step']})")
    ax.set_title("loss")
    ax.legend()
    axes[0][1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[0][1].set_title("learning rate")
    axes[1][0].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    axes[1][0].set_title("tokens / s")
    ax = axes[1][1]
    if any("cuda_peak_allocated_gb" in r for r in train):
        ax.plot([r["step"] for r in train], [r.get("cuda_peak_allocated_gb", 0) for r in train], label="peak allocated")
        ax.plot([r["step"] for r in train], [r.get("cuda_peak_reserved_gb", 0) for r in train], label="peak reserved")
        ax.legend()
        ax.set_title("CUDA memory (GB)")
    elif any("cpu_peak_allocated_gb" in r for r in train):  # a CPU run: the counting allocator's peaks
        steps = [r["step"] for r in train]
        ax.plot(steps, [r.get("cpu_peak_allocated_gb", 0) for r in train], label="peak (all phases)")
        phases = sorted({p for r in train for p in r.get("cpu_peak_by_phase_gb", {})})
        for p in phases:
            ax.plot(steps, [r.get("cpu_peak_by_phase_gb", {}).get(p, float("nan")) for r in train], "--", label=p)
        ax.legend(fontsize=8)
        ax.set_title("CPU tensor memory (GB), by phase")
    else:
        ax.plot([r["step"] for r in train], [r["grad_norm"] for r in train])
        ax.set_title("gradient norm (no memory figures on this run)")
    if dpo:
        ax = axes[2][0]
        steps = [r["step"] for r in train]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            ax.plot(steps, [r.get(key, float("nan")) for r in train], label=key)
        for key in ("val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins"):
            if any(key in r for r in val):
                ax.plot([r["step"] for r in val], [r.get(key, float("nan")) for r in val], "o--", label=key)
        ax.legend(fontsize=8)
        ax.set_title("DPO rewards")
        ax = axes[2][1]
        ax.plot(steps, [r.get("rewards/accuracies", float("nan")) for r in train], label="train")
        if any("val_rewards/accuracies" in r for r in val):
            ax.plot([r["step"] for r in val], [r["val_rewards/accuracies"] for r in val], "o-", label="val")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("DPO reward accuracy")
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "metrics.png")
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
