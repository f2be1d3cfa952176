#!/usr/bin/env python3
"""Reference data for the 8-bit AdamW tests, from torchao 0.18 (run eagerly: torch.compile is
replaced by the identity, so the reference is the same ATen ops torchao's kernel fuses):
its two dynamic quantization maps; block-wise codes and scales of edge-case blocks (ties,
zeros, tiny and huge scales); and AdamW8bit's parameters and state after each of 8 steps on a
fixed gradient sequence, for a quantized (64 x 128) tensor and a small float32 one."""
import os
import sys


def cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            have = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return False
    return all(flag in have for flag in flags)


# MKL's branch as our binaries choose it (core/reproducible_math.h), before torch loads MKL: its
# vector math kernels round sqrt and division differently on another branch, by an ulp.
os.environ.setdefault("MKL_CBWR", "AVX2" if cpu_has("avx2", "fma") else "COMPATIBLE")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main():
    out = sys.argv[1]
    torch.compile = lambda fn=None, **kw: fn  # eager: the reference ops, in torchao's order
    from torchao.optim import AdamW8bit
    from torchao.optim.quant_utils import quantize_8bit_with_qmap, scale_tensor
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    qs, qu = torch.tensor(get_qmap_signed(), dtype=torch.float32), torch.tensor(get_qmap_unsigned(), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(256, generator=g) * s for s in (1e-9, 1e-3, 1.0, 1e4)]
    blocks.append(torch.zeros(256))
    for q in (qs, qu):  # exact midpoints between neighbouring entries (ties), with 1.0 setting the scale
        mid = (q[:-1] + q[1:]) / 2
        blocks.append(torch.cat([mid, torch.ones(1)])[:256].clone())
    x = torch.cat(blocks)
    tensors = {"map_signed": qs, "map_unsigned": qu, "x": x}
    for name, q, data in (("signed", qs, x), ("unsigned", qu, x.abs())):
        scaled, scale = scale_tensor(data, 256)
        tensors[f"codes_{name}"] = quantize_8bit_with_qmap(scaled, q)
        tensors[f"scales_{name}"] = scale
        tensors[f"input_{name}"] = data

    big = torch.nn.Parameter(torch.randn(64, 128, generator=g) * 0.02)
    small = torch.nn.Parameter(torch.randn(100, generator=g) * 0.02)
    tensors.update({"init_big": big.detach().clone(), "init_small": small.detach().clone()})
    opt = AdamW8bit([{"params": [big], "weight_decay": 0.1}, {"params": [small], "weight_decay": 0.0}],
                    lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(8):
        big.grad = torch.randn(64, 128, generator=g) * 10 ** (step % 3 - 2)
        small.grad = torch.randn(100, generator=g) * 0.1
        tensors[f"grad_big_{step}"], tensors[f"grad_small_{step}"] = big.grad.clone(), small.grad.clone()
        opt.step()
        st = opt.state[big]
        tensors[f"big_{step}"], tensors[f"small_{step}"] = big.detach().clone(), small.detach().clone()
        tensors[f"exp_avg_codes_{step}"] = st["exp_avg"].codes.clone()
        tensors[f"exp_avg_scales_{step}"] = st["exp_avg"].scale.clone()
        tensors[f"exp_avg_sq_codes_{step}"] = st["exp_avg_sq"].codes.clone()
        tensors[f"exp_avg_sq_scales_{step}"] = st["exp_avg_sq"].scale.clone()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, out)
    print(f"adamw8bit golden: {x.numel()} values in {len(blocks)} blocks, 8 optimizer steps")


if __name__ == "__main__":
    main()
