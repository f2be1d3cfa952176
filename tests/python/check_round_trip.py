#!/usr/bin/env python3
"""transformers loads the folders the C++ round-trip test saved and reproduces its logits."""
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

TOLERANCE = 1e-5


def main():
    root = sys.argv[1]
    shapes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not shapes:
        sys.exit(f"no round-trip folders under {root}")
    failed = 0
    for shape in shapes:
        model, info = GPT2LMHeadModel.from_pretrained(os.path.join(root, shape, "model"),
                                                      output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs" or (k == "error_msgs" and v)}
        model.eval()
        ref = load_file(os.path.join(root, shape, "cpp_logits.safetensors"))
        with torch.no_grad():
            logits = model(input_ids=ref["input_ids"]).logits.float()
        diff = (logits - ref["logits"]).abs().max().item()
        ok = diff < TOLERANCE and not problems
        failed += not ok
        print(f"[round-trip] {shape}: transformers logits vs C++ max|diff| {diff:.3g} "
              f"(limit {TOLERANCE}); loading problems: {problems or 'none'} -> {'ok' if ok else 'FAIL'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
