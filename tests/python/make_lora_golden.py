#!/usr/bin/env python3
"""Reference outputs from PEFT for the C++ LoRA parity tests.

For each case this writes <out>/<case>/base/ (a Hugging Face GPT-2 folder), <out>/<case>/adapter/
(a PEFT LoRA adapter folder, saved by PEFT, with B made nonzero so every adapter gradient is
informative) and <out>/<case>/golden.safetensors: the input ids, PEFT's logits and loss, and
the gradient of that loss for every adapter tensor, under PEFT's saved names prefixed "grad.".
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from make_golden import random_gpt2

# name: (model fields, LoRA settings, batch, seq_len)
CASES = {
    # the projections people target, tied embeddings
    "lora": (dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=32),
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]), 3, 17),
    # one target name matching two modules, rank-stabilised scaling, untied head
    "lora_rslora": (dict(n_layer=3, n_head=2, n_embd=48, vocab_size=257, n_positions=24, tie_word_embeddings=False),
                    dict(r=3, lora_alpha=5, target_modules=["c_proj"], use_rslora=True), 2, 24),
}


def make(out_dir, name, fields, lora, batch, seq_len, seed):
    base, generator = random_gpt2(fields, seed)
    base_dir = os.path.join(out_dir, name, "base")
    base.save_pretrained(base_dir, safe_serialization=True)

    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, fan_in_fan_out=True, bias="none",
                                            task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(os.path.join(out_dir, name, "adapter"), safe_serialization=True)
    model.eval()

    ids = torch.randint(0, fields["vocab_size"], (batch, seq_len), generator=generator)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    golden = {"input_ids": ids.to(torch.int64), "logits": out.logits.detach().float().contiguous(),
              "loss": out.loss.detach().float().reshape(())}
    for pname, p in model.named_parameters():
        if p.requires_grad:  # saved names: without the adapter name "default"
            golden["grad." + pname.replace(".default", "")] = p.grad.detach().float().contiguous()
    save_file(golden, os.path.join(out_dir, name, "golden.safetensors"))
    return {"case": name, "adapter_tensors": sum(1 for k in golden if k.startswith("grad.")), "loss": out.loss.item()}


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    summary = [make(out_dir, name, *spec, seed=2000 + i) for i, (name, spec) in enumerate(CASES.items())]
    with open(os.path.join(out_dir, "lora_cases.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for s in summary:
        print(f"LoRA golden {s['case']}: {s['adapter_tensors']} adapter tensors, loss {s['loss']:.6f}")


if __name__ == "__main__":
    main()
