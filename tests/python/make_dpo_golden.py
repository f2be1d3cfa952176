#!/usr/bin/env python3
"""Reference DPO losses for the C++ preference-loss test, written with torch from TRL's
DPOTrainer formulas (dpo_loss in trl/trainer/dpo_trainer.py, TRL 0.x; label smoothing in its
conservative form): for random log-probs of 64 examples, each loss type's mean loss, its
gradient in the policy's chosen and rejected log-probs (float64, stored float32), and the
reward metrics. Written as safetensors."""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

CASES = {"sigmoid": ("sigmoid", 0.1, 0.0), "sigmoid_smoothed": ("sigmoid", 0.1, 0.2),
         "sigmoid_beta_half": ("sigmoid", 0.5, 0.0), "ipo": ("ipo", 0.1, 0.0), "hinge": ("hinge", 0.1, 0.0)}


def trl_dpo_loss(pc, pr, rc, rr, loss_type, beta, label_smoothing):
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses, chosen_rewards, rejected_rewards


def main():
    gen = torch.Generator().manual_seed(0)
    n = 64
    # Sums of log-probs over continuations (tens of nats), the reference near the policy.
    pc = -torch.rand(n, generator=gen, dtype=torch.float64) * 60 - 5
    pr = -torch.rand(n, generator=gen, dtype=torch.float64) * 60 - 5
    rc = pc + torch.randn(n, generator=gen, dtype=torch.float64) * 3
    rr = pr + torch.randn(n, generator=gen, dtype=torch.float64) * 3
    # Stored float32; the reference computes from those float32 values, in float64.
    pc, pr, rc, rr = (t.float().double() for t in (pc, pr, rc, rr))
    out = {"policy_chosen": pc.float(), "policy_rejected": pr.float(), "reference_chosen": rc.float(),
           "reference_rejected": rr.float()}
    for name, (loss_type, beta, smoothing) in CASES.items():
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        losses, chosen, rejected = trl_dpo_loss(a, b, rc, rr, loss_type, beta, smoothing)
        loss = losses.mean()
        loss.backward()
        out[f"{name}.loss"] = loss.detach().float().reshape(())
        out[f"{name}.grad_chosen"] = a.grad.float()
        out[f"{name}.grad_rejected"] = b.grad.float()
        out[f"{name}.chosen_reward"] = chosen.mean().float().reshape(())
        out[f"{name}.rejected_reward"] = rejected.mean().float().reshape(())
        out[f"{name}.accuracy"] = (chosen > rejected).float().mean().reshape(())
        out[f"{name}.margin"] = (chosen - rejected).mean().float().reshape(())
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
    print(f"dpo golden: {len(CASES)} cases of {n} examples")


if __name__ == "__main__":
    main()
