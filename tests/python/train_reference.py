"""The PyTorch reference for the training tests: transformers' GPT2LMHeadModel trained with
torch.optim.AdamW on the same batches, in the same order, with the same schedule, so that our
trainer's weights can be compared with it."""
import json
import math
import os
import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from common import write_shard


def make_model(path, seed=0, **fields):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=32)
    cfg.update(fields)
    last = cfg["vocab_size"] - 1
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=last, eos_token_id=last, **cfg))
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_stream(path, n=4000, vocab=97, seed=0):
    """A learnable stream: a short repeating pattern with noise."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab, size=23)
    tokens = np.tile(pattern, n // len(pattern) + 1)[:n]
    noise = rng.random(n) < 0.05
    tokens[noise] = rng.integers(0, vocab, size=noise.sum())
    write_shard(path, tokens)
    return tokens


def lr_at(step, lr, min_lr, warmup, max_steps, kind):
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    factor = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * factor


def reference_train(model_dir, tokens, cfg):
    """Trains like the config says, with samples in shard order (data.shuffle false)."""
    p = cfg["model"].get("dropout", 0.0)
    model = GPT2LMHeadModel.from_pretrained(model_dir, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p).float()
    model.train()
    T, B = cfg["data"]["seq_len"], cfg["train"]["micro_batch_size"]
    A = cfg["train"]["global_batch_size"] // B
    tr = cfg["train"]
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr.get("eps", 1e-8), foreach=False)
    windows = [tokens[k * T: k * T + T + 1] for k in range((len(tokens) - 1) // T)]
    position = 0
    losses = []
    for step in range(tr["max_steps"]):
        lr = lr_at(step, tr["lr"], tr["min_lr"], tr["warmup_steps"], tr["max_steps"], tr["lr_schedule"])
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for _ in range(A):
            batch = []
            for _ in range(B):
                batch.append(windows[position % len(windows)])
                position += 1
            batch = torch.tensor(np.stack(batch).astype(np.int64))
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)) / A
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model, losses


def run_trainer(binary, cfg, workdir, name, env=None):
    path = os.path.join(workdir, f"{name}.json")
    cfg = json.loads(json.dumps(cfg))
    cfg["output_dir"] = os.path.join(workdir, name)
    with open(path, "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([binary, "--config", path], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, **(env or {})))
    if r.returncode != 0:
        raise AssertionError(f"training {name} failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    weights = load_file(os.path.join(cfg["output_dir"], "final", "model.safetensors"))
    return weights, rows, r


def max_weight_diff(a, b):
    """Max |a - b| over the parameters both hold (a: our safetensors dict, b: dict or model)."""
    if isinstance(b, torch.nn.Module):
        b = {k: v.detach() for k, v in b.state_dict().items()}
    worst = 0.0
    for k, v in a.items():
        other = b.get(k)
        if other is None and k.startswith("transformer."):
            other = b.get(k[len("transformer."):])
        assert other is not None, f"reference lacks {k}"
        worst = max(worst, (v.float() - other.float()).abs().max().item())
    return worst
