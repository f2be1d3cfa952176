#!/usr/bin/env python3
"""Reference behaviour of torch.amp.GradScaler on a scripted gradient sequence with infs and
NaNs: the scale before each step, whether the step was skipped, and the scale after update.
Written as JSON for the C++ GradScaler test."""
import json
import sys

import torch


def main():
    out = sys.argv[1]
    opts = dict(init_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    scaler = torch.amp.GradScaler("cpu", **opts)
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(4, requires_grad=True), torch.zeros(3, requires_grad=True)]
    opt = torch.optim.SGD(params, lr=1.0)
    scaler.scale(torch.zeros(()))  # creates the scale tensor
    bad = {4: ("inf", 0), 5: ("nan", 1), 11: ("-inf", 1), 12: ("inf", 0), 13: ("nan", 0), 25: ("inf", 1)}
    steps = []
    for step in range(32):
        grads = [torch.randn(4, generator=gen) + 0.5, torch.randn(3, generator=gen) - 0.5]
        if step in bad:
            kind, which = bad[step]
            grads[which][1] = float(kind)
        scale = scaler.get_scale()
        for p, g in zip(params, grads):
            p.grad = g * scale
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(b, p.detach()) for b, p in zip(before, params))
        as_json = lambda v: v if torch.isfinite(torch.tensor(v)) else str(v)  # "inf", "-inf", "nan"
        steps.append({"grads": [[as_json(v) for v in g.tolist()] for g in grads], "scale": scale, "skipped": skipped,
                      "scale_after": scaler.get_scale()})
    with open(out, "w") as f:
        json.dump({"options": opts, "steps": steps}, f, indent=1)
    print(f"scaler golden: {len(steps)} steps, {sum(s['skipped'] for s in steps)} skipped")


if __name__ == "__main__":
    main()
