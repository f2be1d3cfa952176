#!/usr/bin/env bash
# The README's chat walkthrough, end to end on the CPU: conversations -> tokenize (chatml) ->
# train (full and LoRA) -> generate --chat -> the same models answering through transformers'
# pipeline("text-generation") (and PEFT for the adapter) with the template the folder carries.
#
# No pretrained weights can be downloaded here, so the model is a small GPT-2 with GPT-2's real
# vocabulary (../shared/data/gpt2, or GPT2FT_GPT2_VOCAB_DIR), trained from scratch until it
# knows four answers. With a real checkpoint, give its folder to tokenize and model.init_from.
#
#   scripts/chat_walkthrough.sh [WORK_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/build/gpt2-finetune"
PY="$ROOT/.venv/bin/python"
VOCAB="${GPT2FT_GPT2_VOCAB_DIR:-$ROOT/../shared/data/gpt2}"
W="${1:-$(mktemp -d -t gpt2ft-chat-XXXX)}"
[ -f "$VOCAB/encoder.json" ] || [ -f "$VOCAB/vocab.json" ] || { echo "no GPT-2 vocabulary in $VOCAB" >&2; exit 1; }
mkdir -p "$W"
cd "$W"

# 1. Conversations, one JSON object a line (TRL's conversational format).
"$PY" - <<'EOF'
import json
qa = [("What is the capital of France?", "Paris."),
      ("Who wrote Hamlet?", "William Shakespeare."),
      ("How many legs has a spider?", "Eight."),
      ("What colour is the sky?", "Blue, on a clear day.")]
with open("chats.jsonl", "w") as f:
    for _ in range(8):
        for q, a in qa:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
EOF

# 2. A small GPT-2 with GPT-2's vocabulary (stands in for a downloaded checkpoint).
echo '{"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 50257, "n_positions": 128}' > shape.json
"$BIN" init --config-json shape.json --tokenizer "$VOCAB" --output base --seed 1 2>&1 | tail -1

# 3. Tokenize with ChatML: <|im_start|> and <|im_end|> become ids 50257 and 50258.
"$BIN" tokenize --tokenizer base --input chats.jsonl --output-dir data --chat-template chatml \
    --val-fraction 0 --no-progress 2>&1 | sed 's/^\[[0-9:]*\] //'

# 4. Train: in full, then LoRA (the new tokens' rows train in full, saved with the adapter).
cat > full.json <<EOF
{"model": {"init_from": "base", "dropout": 0.0},
 "data": {"train": "data/train_*.bin", "seq_len": 64},
 "train": {"micro_batch_size": 8, "global_batch_size": 8, "max_steps": 150, "lr": 1e-2, "warmup_steps": 5},
 "output_dir": "full", "device": "cpu", "log": {"every_steps": 50, "progress": "lines"}}
EOF
sed -e 's/"dropout": 0.0}/"dropout": 0.0, "lora": {"rank": 8, "alpha": 16, "targets": ["c_attn", "c_proj", "c_fc"]}}/' \
    -e 's/"output_dir": "full"/"output_dir": "lora"/' -e 's/"max_steps": 150/"max_steps": 300/' full.json > lora.json
for run in full lora; do
  "$BIN" train --config $run.json 2>&1 | grep -E "resizing|LoRA:|done:" | sed 's/^\[[0-9:]*\] //'
done

# 5. Answers from gpt2-finetune: the folder's template, its generation prompt, stop at <|im_end|>.
for q in "What is the capital of France?" "How many legs has a spider?"; do
  echo "full: $q -> $("$BIN" generate --model full/final --chat --prompt "$q" --temperature 0 --max-new-tokens 20)"
  echo "lora: $q -> $("$BIN" generate --model base --adapter lora/final --chat --prompt "$q" --temperature 0 \
      --max-new-tokens 20)"
done

# 6. The same models through transformers (and PEFT), with the template from the folder.
"$PY" - <<'EOF' 2>/dev/null
import warnings
warnings.simplefilter("ignore")
from peft import PeftModel
from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline
full = pipeline("text-generation", model="full/final", device="cpu")
base = GPT2LMHeadModel.from_pretrained("base")
base.resize_token_embeddings(50304, mean_resizing=False)  # as training padded it
lora = pipeline("text-generation", model=PeftModel.from_pretrained(base, "lora/final"),
                tokenizer=AutoTokenizer.from_pretrained("lora/final"), device="cpu")
for q in ("What is the capital of France?", "How many legs has a spider?"):
    for name, pipe in (("full", full), ("lora", lora)):
        out = pipe([{"role": "user", "content": q}], max_new_tokens=20, do_sample=False)
        print(f"transformers {name}: {q} -> {out[0]['generated_text'][-1]['content']}")
EOF
echo "work folder: $W"
