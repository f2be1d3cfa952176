#!/usr/bin/env python3
"""Host AdamW speed, the step train.optimizer_offload "cpu" runs: torch's fused AdamW kernel
(the one the trainer calls, at::_fused_adamw_) on CPU float32 tensors, in 25 MiB buckets as
the trainer feeds it. Reports the median ms per step and ns per parameter, and the
extrapolation to gpt2-xl (1.56B parameters).

  .venv/bin/python scripts/bench/host_adamw_bench.py --params 100e6 --threads 2
"""
import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, bucket = int(args.params), 25 * (1 << 20) // 4
    params = [torch.randn(min(bucket, n - i)) for i in range(0, n, bucket)]
    grads = [torch.randn_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        for i in range(len(params)):  # bucket by bucket, as OffloadedAdamW
            torch._foreach_add_([steps[i]], 1)
            torch._fused_adamw_([params[i]], [grads[i]], [m[i]], [v[i]], [], [steps[i]], lr=1e-4, beta1=0.9,
                                beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
        times.append(time.perf_counter() - start)
    t = statistics.median(times[1:])
    print(f"host fused AdamW, {n / 1e6:.0f}M parameters, {args.threads} threads: {1e3 * t:.0f} ms a step "
          f"({1e9 * t / n:.2f} ns a parameter); gpt2-xl (1.56B) extrapolated: {1.56e9 * t / n * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
