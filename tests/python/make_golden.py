#!/usr/bin/env python3
"""Reference outputs from transformers for the C++ parity tests.

For several GPT-2 shapes this writes <out>/<shape>/model/ (a Hugging Face model folder) and
<out>/<shape>/golden.safetensors holding the input ids, transformers' logits and loss, and
the gradient of that loss for every parameter (Hugging Face names and layouts, prefixed
"grad."), computed in float64 and stored as float32. Weights are random and deliberately larger than GPT-2's init, so that every
parameter visibly moves the outputs.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

# name: (config fields, batch, seq_len, storage)
SHAPES = {
    # the common case: tied embeddings, gelu_new
    "tiny": (dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=64), 3, 17, "hf"),
    # n_head not a power of two, vocab not a multiple of 64, the full context
    "odd_heads": (dict(n_layer=3, n_head=3, n_embd=48, vocab_size=257, n_positions=24), 2, 24, "hf"),
    # untied lm_head, exact gelu, an explicit n_inner
    "untied_gelu": (dict(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=32, n_inner=80,
                         activation_function="gelu", tie_word_embeddings=False), 2, 9, "hf"),
    # bare key names (as in the original OpenAI conversions), bf16 storage, attn.bias buffers
    "bare_bf16": (dict(n_layer=2, n_head=6, n_embd=96, vocab_size=515, n_positions=40), 2, 13, "bare_bf16"),
}


def randomize(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.08 * noise)


def random_gpt2(fields, seed):
    """A float32 transformers GPT-2 of `fields`, no dropout, eager attention, weights from
    randomize(); returns it with the generator, to draw the inputs from next."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    last = fields["vocab_size"] - 1
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=last, eos_token_id=last, **fields)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).float()
    randomize(model, generator)
    return model, generator


def make(out_dir, name, fields, batch, seq_len, storage, seed):
    model, generator = random_gpt2(fields, seed)
    config = model.config
    model.eval()

    model_dir = os.path.join(out_dir, name, "model")
    os.makedirs(model_dir, exist_ok=True)
    if storage == "hf":
        model.save_pretrained(model_dir, safe_serialization=True)
    else:
        # What the hub's original gpt2 file looks like: bare keys, extra buffers, here in bf16.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        tensors = {}
        for key, value in model.state_dict().items():
            if key == "lm_head.weight":
                continue
            tensors[key.removeprefix("transformer.")] = value.to(torch.bfloat16).contiguous()
        n = fields["n_positions"]
        for i in range(fields["n_layer"]):
            tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n).to(torch.bfloat16)
        save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(model_dir)

    ids = torch.randint(0, fields["vocab_size"], (batch, seq_len), generator=generator)
    # The reference is computed in float64 from the float32 weights just saved: what the C++
    # float32 model is compared with then carries no float32 rounding of its own, whichever
    # kernels MKL picks on this CPU. (CI once saw logits 6.6e-5 apart, 40x float32's own error
    # here, that no rerun reproduced; with an exact reference the next such report is ours.)
    model = model.double()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    golden = {
        "input_ids": ids.to(torch.int64),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()),
    }
    for pname, p in model.named_parameters():
        golden["grad." + pname] = p.grad.detach().float().contiguous()
    save_file(golden, os.path.join(out_dir, name, "golden.safetensors"))
    return {"shape": name, "parameters": sum(p.numel() for p in model.parameters()),
            "loss": out.loss.item()}


# The released GPT-2 family, for checking the C++ presets' parameter counts.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}


def preset_parameter_counts():
    counts = {}
    for name, fields in PRESETS.items():
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(**fields))
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    summary = [make(out_dir, name, *spec, seed=1000 + i) for i, (name, spec) in enumerate(SHAPES.items())]
    with open(os.path.join(out_dir, "shapes.json"), "w") as f:
        json.dump({"shapes": summary, "preset_parameters": preset_parameter_counts()}, f, indent=1)
    for s in summary:
        print(f"golden {s['shape']}: {s['parameters']} parameters, loss {s['loss']:.6f}")


if __name__ == "__main__":
    main()
